//! The one-token NF4 GEMV on tensor cores, hand-written in CUDA C++ (`nf4_gemv_tc.cu`, whose
//! header gives the math and layout) and launched through CubeCL's client: CubeCL's NVRTC
//! compile and PTX cache, its stream, its buffers. Only the source is ours.
//!
//! Why not a CubeCL kernel like the others: at one token the GEMV's cost is the instructions
//! per weight, and CubeCL's code generation fixes most of them (docs/benchmarks.md, runs 22-23):
//! it declares shared memory as offsets into one `extern` array, so every code-book lookup adds
//! the shared window's base in a register of its own; it has no byte permute (`prmt`), so a
//! byte is cut out with a shift and a mask; and its MMA fragments are not registers we can
//! fill from a lookup. `nf4_gemv` spends ~6 instructions per weight; this kernel 2-3.
//!
//! The launch ABI is CubeCL's (cubecl-cuda `execute_task`): the buffers' device pointers in
//! the order bound, then the scalars as one struct passed by value (`__grid_constant__`:
//! CubeCL passes its info that way from sm_70, and this kernel needs sm_80 for its MMA).

use burn_cubecl::cubecl::cuda::{CudaCompiler, CudaRuntime};
use burn_cubecl::cubecl::prelude::{
    AddressType, CompiledKernel, ComputeClient, CubeCount, CubeDim, ExecutionMode, KernelId,
    KernelMetadata, StorageType,
};
use burn_cubecl::cubecl::server::{Handle, KernelArguments, MetadataBindingInfo};
use burn_cubecl::cubecl::{CompilationError, CubeTask};

/// The kernel's source, without its compile-time switches, and its hash. For kernel work,
/// `LLM_CUDA_GEMV_TC_SOURCE=path` reads another source at the first launch (so one GPU call can
/// time several versions without a rebuild; `bench/gpu.sh gemv`).
fn source() -> &'static (String, u64) {
    static SOURCE: std::sync::LazyLock<(String, u64)> = std::sync::LazyLock::new(|| {
        use std::hash::{Hash, Hasher};
        let text = match std::env::var("LLM_CUDA_GEMV_TC_SOURCE") {
            Ok(path) => std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("LLM_CUDA_GEMV_TC_SOURCE {path}: {e}")),
            Err(_) => include_str!("nf4_gemv_tc.cu").to_string(),
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut h);
        (text, h.finish())
    });
    &SOURCE
}

/// Most planes (warps) per cube: `__launch_bounds__` of 1024 threads.
pub const TC_MAX_PLANES: usize = 32;

/// One compiled variant of the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TcVariant {
    /// Warps per cube: they split `k` in windows of 128.
    pub planes: usize,
    /// 16-row tiles per cube.
    pub tiles: usize,
    /// gate/up with the activation, else stacked (q/k/v) or single.
    pub gated: bool,
    pub gelu: bool,
    /// Windows each plane has loaded ahead of its math (registers: 1 or 3).
    pub depth: usize,
}

struct TcKernel {
    variant: TcVariant,
}

impl TcKernel {
    fn cube_dim(&self) -> CubeDim {
        CubeDim::new_1d(32 * self.variant.planes as u32)
    }

    fn source(&self) -> String {
        let v = self.variant;
        format!(
            "#define PLANES {}\n#define TILES {}\n#define GATED {}\n#define GELU {}\n\
             #define DEPTH {}\n{}",
            v.planes,
            v.tiles,
            v.gated as u32,
            v.gelu as u32,
            v.depth,
            source().0
        )
    }
}

impl KernelMetadata for TcKernel {
    fn id(&self) -> KernelId {
        // The source is part of the id: CubeCL's PTX cache is keyed by it, and a changed
        // source must not meet an old entry.
        KernelId::new::<Self>()
            .info((self.variant, source().1))
            .cube_dim(self.cube_dim())
    }

    fn address_type(&self) -> StorageType {
        AddressType::U32.unsigned_type()
    }
}

impl CubeTask<CudaCompiler> for TcKernel {
    fn compile(
        &self,
        _compiler: &mut CudaCompiler,
        _options: &<CudaCompiler as burn_cubecl::cubecl::Compiler>::CompilationOptions,
        _mode: ExecutionMode,
        _address_type: StorageType,
    ) -> Result<CompiledKernel<CudaCompiler>, CompilationError> {
        // CubeCL reads the representation for the dynamic shared memory the launch asks for
        // (none: the kernel's shared arrays are static, 34 KiB at most) and nothing else.
        let u32_item = cubecl_cpp::shared::Item::scalar(cubecl_cpp::shared::Elem::U32, true);
        let repr = cubecl_cpp::ComputeKernel {
            tensor_maps: vec![],
            buffers: vec![],
            scalars: vec![],
            info: Default::default(),
            meta_static_len: 0,
            body: cubecl_cpp::shared::Body {
                instructions: vec![],
                shared_memories: vec![],
                pipelines: vec![],
                barriers: vec![],
                const_arrays: vec![],
                local_arrays: vec![],
                info_by_ptr: false,
                has_dynamic_meta: false,
                address_type: u32_item,
            },
            cube_dim: self.cube_dim(),
            cluster_dim: None,
            extensions: vec![],
            flags: Default::default(),
            items: Default::default(),
            kernel_name: "nf4_gemv_tc".into(),
        };
        Ok(CompiledKernel {
            entrypoint_name: "nf4_gemv_tc".into(),
            debug_name: Some("nf4_gemv_tc"),
            source: self.source(),
            repr: Some(repr),
            cube_dim: self.cube_dim(),
            debug_info: None,
        })
    }
}

/// The kernel's buffers, in the order its signature takes them.
pub struct TcBuffers {
    /// `[k]` bf16.
    pub x: Handle,
    /// Per stacked weight (unused ones bound to weight 0): packed codes and f32 absmax.
    pub packed: [Handle; 3],
    pub absmax: [Handle; 3],
    /// 16 f32.
    pub code: Handle,
    /// bf16.
    pub out: Handle,
}

/// `Sizes` of the source: `n0, n1, n2, cut1, cut2, base1, base2, k`.
pub type TcSizes = [u32; 8];

/// Launch `cubes` cubes of `variant` (the caller checked the shapes the source's header asks).
///
/// # Safety
/// Every buffer must hold what the source's header says for `sizes` and `cubes`.
pub unsafe fn launch(
    client: &ComputeClient<CudaRuntime>,
    variant: TcVariant,
    cubes: u32,
    buffers: TcBuffers,
    sizes: TcSizes,
) {
    assert!((1..=TC_MAX_PLANES).contains(&variant.planes) && matches!(variant.tiles, 1 | 2));
    assert!(
        matches!(variant.depth, 1 | 3),
        "tensor-core GEMV depth 1 or 3"
    );
    let TcBuffers {
        x,
        packed: [p0, p1, p2],
        absmax: [a0, a1, a2],
        code,
        out,
    } = buffers;
    let bindings = [x, p0, a0, p1, a1, p2, a2, code, out].map(Handle::binding);
    let words: Vec<u64> = sizes
        .chunks(2)
        .map(|p| p[0] as u64 | (p[1] as u64) << 32)
        .collect();
    let len = words.len();
    // All of it is the by-value struct: nothing past it goes up as a buffer.
    let info = MetadataBindingInfo::new(words, len);
    let args = KernelArguments::new()
        .with_buffers(bindings.into())
        .with_info(info);
    // SAFETY: the caller's.
    unsafe {
        client.launch_unchecked(
            Box::new(TcKernel { variant }),
            CubeCount::Static(cubes, 1, 1),
            args,
        )
    }
}
