//! Burn building blocks every architecture shares. An architecture crate holds only its Config,
//! its wiring and its weight names; everything here is reused, never copied.

pub mod attention;
pub mod backend;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod describe;
#[cfg(feature = "cuda")]
pub mod driver;
pub mod engine;
pub mod error;
pub mod export;
#[cfg(feature = "cuda")]
pub mod gemv_tc;
pub mod host_linear;
pub mod linear;
pub mod mlp;
pub mod model;
pub mod moe;
pub mod nf4;
pub mod norm;
pub mod rope;
pub mod sampling;
pub mod testing;
pub mod weights;

pub use burn_tensor;
pub use llm_abi as abi;
pub use llm_formats as formats;

pub use attention::{Attention, AttentionConfig, ForwardCtx, KvCache, QkvProj};
pub use backend::LlmBackend;
pub use config::{parse_config, Activation, RopeConfig, RopeFields};
pub use describe::{Describer, Description, Module};
pub use engine::{CausalLm, DynEngine, Engine, StepInput};
pub use error::{CoreError, Result};
pub use export::{Architecture, Cpu, LoadOptions};
pub use linear::{DenseLinear, Linear};
pub use mlp::{GateUp, GatedMlp, GATE_UP_DOWN};
pub use model::{CausalDecoder, DecoderLayer, DecoderSpec, PreNormLayer};
pub use moe::SparseMoe;
pub use norm::RmsNorm;
pub use rope::Rope;
pub use weights::{LoadCtx, Weights};
