//! Compiles the etcd v3 API and kine-rs's admin API with `protox` (a pure-Rust protobuf compiler), so building
//! kine-rs never needs a system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "etcd/etcdserverpb/rpc.proto",
        "etcd/mvccpb/kv.proto",
        "kine/admin/v1/admin.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Keys and values as `bytes::Bytes`: fanning one event out to many watchers clones
        // reference counts, not payloads.
        .bytes(".")
        .compile_fds(descriptors)?;
    Ok(())
}
