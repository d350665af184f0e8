//go:build tools

// Package tools pins the command this module builds: the helm CLI, from the
// published helm.sh/helm/v4 module.
package tools

import (
	_ "helm.sh/helm/v4/cmd/helm"
)
