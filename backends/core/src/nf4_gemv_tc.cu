// NF4 x bf16 GEMV for one token on tensor cores: `nf4_gemv_tc`.
//
// Hand-written CUDA C++ (not CubeCL): gemv_tc.rs says why and how it launches. The host
// prepends the compile-time switches:
//   PLANES  warps per cube (they split `k`: warp p takes a run of consecutive windows),
//   TILES   16-row tiles per cube (a cube owns 16 * TILES output rows),
//   GATED   1: two weights of equal n (gate, up), out = act(gate) * up; 0: stacked (q/k/v),
//   GELU    1: GELU (tanh) as the activation, 0: SiLU,
//   DEPTH   windows each plane loads ahead of its math (1 or 3).
//
// Math: `out[row] = sum over blocks b of absmax[row, b] * sum_k code_bf16[q(row, k)] x[k]`,
// the inner sums exact products summed in f32 by `mma.m16n8k16` (bf16 inputs), the absmax (f32)
// applied to each block's sum. The code book is rounded to bf16 as bitsandbytes' own one-token
// GEMV rounds it (`kgemm_4bit_inference_naive` in csrc/kernels.cu keeps `quant_map` in the
// compute dtype); bnb also rounds absmax and each product to bf16, which this kernel does not.
//
// Why tensor cores at one token: the SIMT GEMV (`nf4_gemv`, cuda.rs) spends ~6 instructions
// per weight (a shift, a mask, the shared window's add, a lookup, an FMA; docs/benchmarks.md
// run 23); here a lookup (`prmt`, `lea`, `lds`) yields two weights as one MMA register and the
// tensor cores do the multiply-adds: ~3 instructions per weight in all (SASS of sm_90a).
//
// Operands. A (16 x 16, row major): the weights, 16 output rows by 16 `k`. B (16 x 8): `x`.
// A plane walks its windows of 128 `k` in groups of 4: window c (0..3) of a group puts `x` on
// its first absmax block in B's column 2c and on its second in column 2c + 1 (zeros in the
// other columns), so D's columns 2c, 2c + 1 (held by lanes t = c) are each row's two block
// sums. Lane t keeps the absmax of window c = t of each group (one 8-byte load per row and 4
// windows) and scales what its columns hold; in the other windows its columns are zeros.
//
// Lookups: a byte of packed codes (two weights; the first in the high nibble) indexes a table
// of the 256 bytes' bf16 code pairs (first weight in the low half, as an MMA register holds two
// consecutive `k`). The table has one copy per lane (entry e of lane l at word 32 e + l:
// 32 KiB), so a plane's 32 lookups hit 32 distinct banks whatever the bytes.
//
// Layout per plane and window of 128 `k`: lane (g, t) = (lane / 4, lane % 4) loads the
// 16-byte vector of codes at `k` = 128 w + 32 t of rows g and g + 8 of each tile (t = 0, 1: the
// window's first block, t = 2, 3: its second). The codes are tiled (nf4.rs `tile_codes`: per 16
// rows and window, a kilobyte of the rows' 64 bytes in order), so each of these loads reads 512
// contiguous bytes in lane order: a quarter warp, one 128-byte line. MMA s (0..8)
// takes bytes 2s and 2s + 1 of each vector: a0 / a2 = row g's weights 4s, 4s+1 / 4s+2, 4s+3
// (the MMA's k slots 2t, 2t+1 / 2t+8, 2t+9), a1 / a3 the same of row g + 8; b0 / b1 = `x` at the
// same `k` (lanes g = 2c, t < 2 and g = 2c + 1, t >= 2 of window c; zeros elsewhere).
//
// Measured (docs/benchmarks.md, runs 25-27, Nsight Compute, H200): at 4096x14336, 15.6 us on
// row-major codes with planes taking every PLANES-th window; 15.0 with runs of consecutive
// windows (one absmax load per 4 windows); 14.2 on these tiles (14.8-15.0 on tiles of 8 or 16
// rows x 64 `k`, where a quarter warp's loads span two lines); run 27: 13.5-13.7 (61% of copy)
// with the absmax tiled alike (a warp's absmax load one 64-byte run instead of 8 rows' pieces
// `k / 16` bytes apart). The same loads without the
// math: 11.4 us; a plain coalesced read of the same bytes: 10.2. Not kept: code lookups by
// `prmt` from registers (~20 instructions per 8 weights; slower), an L2 bulk prefetch of each
// plane's codes (slower), more windows in flight (registers: fewer warps); run 27: loads that
// skip L1 (`ld.global.nc.L1::no_allocate`) with each plane's `x` prefetched into L1 (no gain at
// 4096x14336, 4% slower at 14336x4096), two MMA accumulator chains (slower).

// Buffers: x [k] bf16 (read as 16-byte vectors), packed_i the tiled codes as 16-byte vectors,
// absmax_i the f32 absmax tiled as the codes (nf4.rs `tile_absmax`), code [16] f32, out bf16. Sizes as `nf4_gemv`'s (cuda.rs):
// stacked weight i's cubes from cube cut_i, its outputs from element base_i; `k` a multiple of
// 128; every stacked weight but the last a multiple of 16 * TILES rows.

typedef unsigned int u32;
typedef unsigned short u16;

struct Sizes {
    u32 n0, n1, n2, cut1, cut2, base1, base2, k;
};

#define ROWS (16 * TILES)
#define LANES (GATED ? 2 : 1)

// (hi, lo) rounded to bf16 into one register: lo in bits 0..15.
static __device__ __forceinline__ u32 pack_bf16x2(float hi, float lo) {
    u32 d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

static __device__ __forceinline__ u16 to_bf16(float a) {
    u16 d;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(d) : "f"(a));
    return d;
}


// d += A B for one 16 x 16 x 8 step, f32 accumulators.
static __device__ __forceinline__ void mma(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0,
                                           u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// A word of this lane's copy of the pair table at shared address `addr`. (In PTX: C++ would
// let the compiler split the address back into table, lane and byte parts and add them per
// lookup.)
static __device__ __forceinline__ u32 lds(u32 addr) {
    u32 v;
    asm("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr));
    return v;
}

// d = A B (accumulators from zero).
static __device__ __forceinline__ void mma0(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0,
                                            u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%10,%10,%10,%10};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(0.0f));
}

// The code pair of byte `b` (0..3) of `w`: the byte (one `prmt`) times 128 bytes per table row,
// plus `table`, this lane's shared address in row 0 (one `lea`).
#define PAIR(table, w, b) lds((__byte_perm((w), 0, 0x4440 + (b)) << 7) + (table))

static __device__ __forceinline__ u32 word_of(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

#if GATED
static __device__ __forceinline__ float round_bf16(float a) {
    return __uint_as_float(((u32)to_bf16(a)) << 16);
}

// `act(gate) * up` rounded as cuda.rs `gate_times_up` rounds (HF's bf16 ops): each projection
// to bf16, the activation (f32 inside) to bf16, the product to bf16.
static __device__ __forceinline__ u16 gate_times_up(float gate, float up) {
    float g = round_bf16(gate);
#if GELU
    float inner = 0.7978846f * (g + 0.044715f * g * g * g);
    float a = 0.5f * g * (1.0f + tanhf(inner));
#else
    float a = g / (1.0f + expf(-g));
#endif
    return to_bf16(round_bf16(a) * round_bf16(up));
}
#endif

// Code slots per plane: window c of a group in slot c % SLOTS, DEPTH windows ahead loading.
#define SLOTS (DEPTH + 1)

// One weight, one tile: 64 registers at most (1024 threads per SM; with more, the 4096-row
// shapes run one 16-warp cube per SM instead of two). Gated or two tiles: as many as it takes
// (capped at 64 they spill).
#define MIN_CUBES (GATED || TILES > 1 ? 1 : 32 / PLANES > 0 ? 32 / PLANES : 1)
extern "C" __global__ void __launch_bounds__(32 * PLANES, MIN_CUBES)
    nf4_gemv_tc(const uint4* __restrict__ x, const uint4* __restrict__ packed0,
                const float* __restrict__ absmax0, const uint4* __restrict__ packed1,
                const float* __restrict__ absmax1, const uint4* __restrict__ packed2,
                const float* __restrict__ absmax2, const float* __restrict__ code,
                u16* __restrict__ out, const __grid_constant__ Sizes s) {
    static_assert(4 % SLOTS == 0, "DEPTH 1 or 3");
    __shared__ __align__(16) u32 pairs[256 * 32];
    __shared__ float partial[PLANES][LANES][ROWS];

    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 g = lane >> 2, t = lane & 3;
    const u32 cube = blockIdx.x;
    const bool in1 = !GATED && cube >= s.cut1, in2 = !GATED && cube >= s.cut2;
    const u32 n = in2 ? s.n2 : in1 ? s.n1 : s.n0;
    const u32 first = in2 ? s.cut2 : in1 ? s.cut1 : 0;
    const u32 row0 = (cube - first) * ROWS;
    const uint4* P[LANES];
    const float* A[LANES];
    P[0] = in2 ? packed2 : in1 ? packed1 : packed0;
    A[0] = in2 ? absmax2 : in1 ? absmax1 : absmax0;
#if GATED
    P[1] = packed1;
    A[1] = absmax1;
#endif
    const u32 blocks = s.k / 64, windows = s.k / 128;
    // This plane's windows: a run of consecutive ones (its codes and absmax per tile a run).
    const u32 per = (windows + PLANES - 1) / PLANES;
    const u32 lo = min(warp * per, windows), hi = min(lo + per, windows);

    // Per tile, this lane's rows g and g + 8 (rows past n read row n - 1 and are not written):
    // the vector of codes in window 0 (tiled: per 16 rows, a 64-vector tile per window, 4
    // vectors per row) and the row's absmax of window 0 (tiled alike: per 16 rows and window,
    // the rows' two absmax one after the other, 32 floats).
    u32 vec0[TILES][2], abs0[TILES][2];
#pragma unroll
    for (int i = 0; i < TILES; i++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const u32 row = min(row0 + 16 * i + 8 * h + g, n - 1);
            vec0[i][h] = (row >> 4) * (s.k / 2) + (row & 15) * 4 + t;
            abs0[i][h] = (row >> 4) * (blocks * 16) + (row & 15) * 2;
        }
    }

    uint4 q[SLOTS][LANES][TILES][2];
// (Loop variables with a trailing _: the arguments may name an `l`, `i` or `h`.)
#define LOAD_CODES(slot, win)                                                          \
    _Pragma("unroll") for (int l_ = 0; l_ < LANES; l_++)                                  \
        _Pragma("unroll") for (int i_ = 0; i_ < TILES; i_++)                              \
            _Pragma("unroll") for (int h_ = 0; h_ < 2; h_++)                              \
                q[slot][l_][i_][h_] = P[l_][vec0[i_][h_] + 64 * (win)];
    // Absmax of a group of 4 windows from j0: lane t's window j0 + t, both blocks, rows g and
    // g + 8 (zeros past the plane's last window).
    // (am_next zeroed: the last group copies it unloaded.)
    float2 am[LANES][TILES][2], am_next[LANES][TILES][2] = {};
#define LOAD_ABSMAX(dst, j0)                                                           \
    _Pragma("unroll") for (int l_ = 0; l_ < LANES; l_++)                                  \
        _Pragma("unroll") for (int i_ = 0; i_ < TILES; i_++)                              \
            _Pragma("unroll") for (int h_ = 0; h_ < 2; h_++)                              \
                dst[l_][i_][h_] = (j0) + t < hi                                          \
                    ? *(const float2*)&A[l_][abs0[i_][h_] + 32 * ((j0) + t)]              \
                    : make_float2(0.0f, 0.0f);
#pragma unroll
    for (int d = 0; d < DEPTH; d++)
        if (lo + d < hi) {
            LOAD_CODES(d, lo + d)
        }
    LOAD_ABSMAX(am, lo)

    // The table, while the first codes are in flight: 8 threads per entry, 4 copies each.
    for (u32 i = threadIdx.x; i < 256 * 8; i += 32 * PLANES) {
        u32 e = i >> 3;
        u32 v = pack_bf16x2(code[e & 15], code[e >> 4]);
        *(uint4*)&pairs[e * 32 + (i & 7) * 4] = make_uint4(v, v, v, v);
    }
    __syncthreads();
    const u32 table = (u32)__cvta_generic_to_shared(pairs) + lane * 4;

    float acc[LANES][TILES][2];
#pragma unroll
    for (int l = 0; l < LANES; l++)
#pragma unroll
        for (int i = 0; i < TILES; i++) acc[l][i][0] = acc[l][i][1] = 0.0f;

    for (u32 j0 = lo; j0 < hi; j0 += 4) {
        if (j0 + 4 < hi) {
            LOAD_ABSMAX(am_next, j0 + 4)
        }
#pragma unroll
        for (int c = 0; c < 4; c++) {
            const u32 win = j0 + c;
            if (win >= hi) break;
            // `x` of this window in B's columns 2c and 2c + 1.
            const bool xlane = (g == 2 * c && t < 2) || (g == 2 * c + 1 && t >= 2);
            uint4 xv[4];
#pragma unroll
            for (int j = 0; j < 4; j++)
                xv[j] = xlane ? x[win * 16 + t * 4 + j] : make_uint4(0, 0, 0, 0);
            if (win + DEPTH < hi) {
                LOAD_CODES((c + DEPTH) % SLOTS, win + DEPTH)
            }
            const auto& qc = q[c % SLOTS];
#pragma unroll
            for (int l = 0; l < LANES; l++) {
#pragma unroll
                for (int i = 0; i < TILES; i++) {
                    float dd[4];
#pragma unroll
                    for (int st = 0; st < 8; st++) {
                        const u32 wa = word_of(qc[l][i][0], st / 2);
                        const u32 wb = word_of(qc[l][i][1], st / 2);
                        const int b0 = 2 * (st % 2), b1 = b0 + 1;
                        const u32 a0 = PAIR(table, wa, b0), a2 = PAIR(table, wa, b1);
                        const u32 a1 = PAIR(table, wb, b0), a3 = PAIR(table, wb, b1);
                        const u32 x0 = word_of(xv[st / 2], (2 * st) % 4);
                        const u32 x1 = word_of(xv[st / 2], (2 * st + 1) % 4);
                        if (st == 0) mma0(dd, a0, a1, a2, a3, x0, x1);
                        else mma(dd, a0, a1, a2, a3, x0, x1);
                    }
                    // dd: rows g (blocks 0, 1), g + 8 (blocks 0, 1) in lanes t = c; zeros in
                    // the others (their absmax finite: a window's, or 0).
                    acc[l][i][0] += am[l][i][0].x * dd[0] + am[l][i][0].y * dd[1];
                    acc[l][i][1] += am[l][i][1].x * dd[2] + am[l][i][1].y * dd[3];
                }
            }
        }
#pragma unroll
        for (int l = 0; l < LANES; l++)
#pragma unroll
            for (int i = 0; i < TILES; i++) {
                am[l][i][0] = am_next[l][i][0];
                am[l][i][1] = am_next[l][i][1];
            }
    }

    // A row's sum is spread over its four lanes t.
#pragma unroll
    for (int l = 0; l < LANES; l++)
#pragma unroll
        for (int i = 0; i < TILES; i++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                acc[l][i][h] += __shfl_xor_sync(0xffffffffu, acc[l][i][h], 1);
                acc[l][i][h] += __shfl_xor_sync(0xffffffffu, acc[l][i][h], 2);
            }
    if (t == 0) {
#pragma unroll
        for (int l = 0; l < LANES; l++)
#pragma unroll
            for (int i = 0; i < TILES; i++) {
                partial[warp][l][16 * i + g] = acc[l][i][0];
                partial[warp][l][16 * i + g + 8] = acc[l][i][1];
            }
    }
    __syncthreads();
    if (threadIdx.x < ROWS) {
        const u32 r = threadIdx.x, row = row0 + r;
        if (row < n) {
            float sum[LANES];
#pragma unroll
            for (int l = 0; l < LANES; l++) {
                sum[l] = 0.0f;
                for (int p = 0; p < PLANES; p++) sum[l] += partial[p][l][r];
            }
#if GATED
            out[row] = gate_times_up(sum[0], sum[1]);
#else
            const u32 base = in2 ? s.base2 : in1 ? s.base1 : 0;
            out[base + row] = to_bf16(sum[0]);
#endif
        }
    }
}
