//go:build tools

// Package tools pins the command this module builds: kwok, from the
// published sigs.k8s.io/kwok module.
package tools

import (
	_ "sigs.k8s.io/kwok/cmd/kwok"
)
