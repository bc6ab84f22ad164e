use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protoc comes from the protoc-bin-vendored crate: a fresh machine needs no system protoc.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("llm_v1_descriptor.bin"))
        .compile_protos(&["llm/v1/llm.proto"], &["."])?;
    println!("cargo:rerun-if-changed=llm/v1/llm.proto");
    Ok(())
}
