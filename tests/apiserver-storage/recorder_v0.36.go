package testserver

import (
	"go.etcd.io/etcd/client/v3/kubernetes"
	storagetesting "k8s.io/apiserver/pkg/storage/testing"
)

// recordRequests wraps the client's KV and Kubernetes interfaces in the recorders the storage
// tests count requests with (k8s.io/apiserver v0.36).
func recordRequests(client *kubernetes.Client) {
	client.KV = storagetesting.NewKVRecorder(client.KV)
	client.Kubernetes = storagetesting.NewKubernetesRecorder(client.Kubernetes)
}
