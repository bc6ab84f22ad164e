//! Rust types generated from `proto/llm/v1/llm.proto`.

pub mod v1 {
    tonic::include_proto!("llm.v1");

    /// Encoded `FileDescriptorSet` of llm.v1, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("llm_v1_descriptor");
}
