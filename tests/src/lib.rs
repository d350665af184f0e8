//! Tower's end-to-end suite support: the test bed of real control-plane processes
//! (etcd, kube-apiserver, kubectl) that the integration tests under `tests/tests/` run against.

pub mod bench;
pub mod fixture;
pub mod testbed;
