package testserver

import (
	"go.etcd.io/etcd/client/v3/kubernetes"
	storagetesting "k8s.io/apiserver/pkg/storage/testing"
)

// recordRequests wraps the client's KV and Kubernetes interfaces in the recorders the storage
// tests count requests with (k8s.io/apiserver v0.37: the KV recorder shares the Kubernetes
// one's record).
func recordRequests(client *kubernetes.Client) {
	kubernetesRecorder := storagetesting.NewKubernetesRecorder(client.Kubernetes)
	client.KV = storagetesting.NewKVRecorder(client.KV, kubernetesRecorder)
	client.Kubernetes = kubernetesRecorder
}
