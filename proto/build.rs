//! Generates the gRPC code from `berth/v1/*.proto`, with the vendored protoc unless PROTOC is set.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-env-changed=PROTOC");
    for proto in [
        "berth/v1/agent.proto",
        "berth/v1/raft.proto",
        "berth/v1/controller.proto",
    ] {
        println!("cargo:rerun-if-changed={proto}");
    }
    let protoc = match std::env::var_os("PROTOC") {
        Some(path) => std::path::PathBuf::from(path),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    config.bytes(["."]);
    tonic_prost_build::configure().compile_with_config(
        config,
        &[
            "berth/v1/agent.proto",
            "berth/v1/raft.proto",
            "berth/v1/controller.proto",
        ],
        &["."],
    )?;
    Ok(())
}
