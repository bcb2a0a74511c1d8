// Package testserver serves Kubernetes' apiserver storage tests
// (k8s.io/apiserver/pkg/storage/etcd3) from kine-rs instead of the embedded etcd they start.
//
// scripts/peers.sh copies k8s.io/apiserver's module, puts this file in place of
// pkg/storage/etcd3/testserver/test_server.go (same package, same two functions, same
// signatures), adds recorder_v0.MINOR.go of the module's minor version (how requests are
// recorded for the tests to count changed in v0.37) and builds the package's test binary;
// tests/tests/apiserver_storage.rs runs it against each datastore. Every server a test asks for is a kine-rs process of its own, on a
// unix socket, serving a keyspace of its own:
//
//   - KINE_RS_BIN: the kine-rs binary (required: without it every test fails, none falls back
//     to etcd).
//   - KINE_RS_ENDPOINT: the datastore, `{dir}` replaced by the test's own directory; by
//     default a SQLite file there. On a shared database each server is a tenant of its own
//     (`--tenant`, named after the directory), so every test starts from revision 1 as on a
//     fresh etcd.
//
// As the embedded etcd: no automatic compaction, and progress notifications at the interval
// the test's configuration names (etcd's 10 minutes when it names none).
package testserver

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/kubernetes"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
)

// etcdProgressInterval is etcd's default interval of progress notifications.
const etcdProgressInterval = 10 * time.Minute

// NewTestConfig returns the configuration RunEtcd reads: a directory of the test's own, and
// the progress notification interval (the only field the storage tests change).
func NewTestConfig(t testing.TB) *embed.Config {
	cfg := embed.NewConfig()
	cfg.Dir = t.TempDir()
	cfg.WatchProgressNotifyInterval = etcdProgressInterval
	return cfg
}

// RunEtcd starts kine-rs as cfg says (NewTestConfig's when nil) and returns a client of it,
// recording its requests as the embedded etcd's test server does (recordRequests). The process stops when the
// test ends.
func RunEtcd(t testing.TB, cfg *embed.Config) *kubernetes.Client {
	t.Helper()
	if cfg == nil {
		cfg = NewTestConfig(t)
	}
	bin := os.Getenv("KINE_RS_BIN")
	if bin == "" {
		t.Fatal("KINE_RS_BIN is not set: these tests run against kine-rs, never an embedded etcd")
	}
	endpoint := os.Getenv("KINE_RS_ENDPOINT")
	if endpoint == "" {
		endpoint = "sqlite://{dir}/state.db"
	}
	endpoint = strings.ReplaceAll(endpoint, "{dir}", cfg.Dir)
	interval := cfg.WatchProgressNotifyInterval
	if interval <= 0 {
		interval = etcdProgressInterval
	}
	digest := sha256.Sum256([]byte(cfg.Dir))
	tenant := "t" + hex.EncodeToString(digest[:8])
	// A short path of its own: the test's directory can be longer than a socket's path may be.
	var suffix [8]byte
	if _, err := rand.Read(suffix[:]); err != nil {
		t.Fatal(err)
	}
	socket := filepath.Join(os.TempDir(), "kine-rs-"+hex.EncodeToString(suffix[:])+".sock")
	logPath := filepath.Join(cfg.Dir, "kine-rs.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin,
		"--endpoint", endpoint,
		"--listen-address", "unix://"+socket,
		"--tenant", tenant,
		"--compact-interval", "0",
		"--watch-progress-notify-interval", interval.String(),
	)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	if err := cmd.Start(); err != nil {
		logFile.Close()
		t.Fatalf("starting %s: %v", bin, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		stop(cmd, exited)
		logFile.Close()
		os.Remove(socket)
	})
	if err := waitForSocket(socket, exited, 60*time.Second); err != nil {
		t.Fatalf("kine-rs (%s) did not serve %s: %v\n%s", endpoint, socket, err, tail(logPath))
	}

	client, err := kubernetes.New(clientv3.Config{
		Endpoints:   []string{"unix://" + socket},
		DialTimeout: 10 * time.Second,
		DialOptions: []grpc.DialOption{grpc.WithBlock()},
		Logger:      zaptest.NewLogger(t, zaptest.Level(zapcore.ErrorLevel)).Named("etcd-client"),
	})
	if err != nil {
		t.Fatal(err)
	}
	recordRequests(client)
	return client
}

// waitForSocket waits until the socket takes connections, the process exits or the time is up.
func waitForSocket(socket string, exited chan error, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		if conn, err := net.Dial("unix", socket); err == nil {
			conn.Close()
			return nil
		}
		select {
		case err := <-exited:
			exited <- err
			return fmt.Errorf("it exited before serving: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not within %s", limit)
		}
	}
}

// stop ends the process: SIGTERM, then SIGKILL if it has not exited within 10 s.
func stop(cmd *exec.Cmd, exited chan error) {
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		<-exited
	}
}

// tail is the end of the process's log, for a failure's message.
func tail(path string) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	if len(data) > 4000 {
		data = data[len(data)-4000:]
	}
	return string(data)
}
