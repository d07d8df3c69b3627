// FP8 (e4m3) grouped GEMM with DeepSeek-V3 block scaling, mma.sync version.
//
//   C[r, n] = sum_kb  sa[r, kb] * sb[g, n / 128, kb] * sum_{k in block kb} A[r, k] * B[g, n, k]
//
// A  [M, K]      e4m3, rows sorted by group, group g owns counts[g] consecutive rows.
// SA [M, K/128]  float32, one scale per row per 128 channels.
// B  [G, N, K]   e4m3 (K contiguous).
// SB [G, N/128, K/128] float32, one scale per 128x128 block.
//
// Each 128-wide K block is accumulated by the tensor cores into a partial fp32 tile, which is then
// scaled by sa * sb and added into the fp32 accumulator (the "promotion" of DeepSeek-V3).
//
// Compile-time configuration (NVRTC -D options):
//   BM, BN      CTA tile (rows x output columns), BK is fixed at 128
//   WM, WN      warps along M and N; warp tile is (BM / WM) x (BN / WN)
//   STAGES      cp.async pipeline depth
//   EPI         0: store C as bf16 [M, N]
//               1: SwiGLU + per-row FP8 quantization. N = 2 * I (gate rows [0, I), up rows [I, 2I));
//                  the CTA computes 128 intermediate channels (BN == 256: 128 gate + 128 up) and
//                  writes h8 [M, I] e4m3 and its scales [M, I / 128] float32.
//               2: out[row_token[r], n] += row_weight[r] * C[r, n] into float32 [T, N] (atomics).
//
// Plain CUDA C++ and inline PTX (sm_90a); the only header is common.cuh beside this file.

#ifndef BM
#define BM 128
#endif
#ifndef BN
#define BN 128
#endif
#ifndef WM
#define WM 2
#endif
#ifndef WN
#define WN 4
#endif
#ifndef STAGES
#define STAGES 4
#endif
#ifndef EPI
#define EPI 0
#endif
#ifndef WGMMA
#define WGMMA 0  // 1: Hopper warpgroup MMA (sm_90a), one warpgroup per 64 rows of the tile
#endif

#define BK 128
#define NTHREADS (WM * WN * 32)
#define WTM (BM / WM)  // warp tile rows
#define WTN (BN / WN)  // warp tile columns
#define MT (WTM / 16)  // m16 tiles per warp
#define NT (WTN / 8)   // n8 tiles per warp
#define A_STAGE_BYTES (BM * BK)
#define B_STAGE_BYTES (BN * BK)
#define STAGE_BYTES (A_STAGE_BYTES + B_STAGE_BYTES)  // stages are 1024-byte aligned
// Dynamic shared memory: STAGES x (A tile, B tile), then STAGES x BM row scales; the host adds
// 1024 bytes so the base can be aligned to the 128-byte swizzle atom (8 rows x 128 B).

static_assert(BM % (WM * 16) == 0, "BM must split into m16 tiles per warp");
static_assert(BN % (WN * 16) == 0, "BN must split into pairs of n8 tiles per warp");
static_assert((BM * 8) % NTHREADS == 0 || NTHREADS % (BM * 8) == 0, "A tile chunks vs threads");
static_assert((BN * 8) % NTHREADS == 0, "B tile chunks must split evenly over threads");
static_assert(BM <= NTHREADS, "one thread per row loads the row scales");
#if WGMMA
static_assert(WN == 1 && WM * 16 == BM && BM % 64 == 0, "wgmma: warps stacked along M, 64-row WGs");
static_assert(BN % 128 == 0, "wgmma: the N tile is a whole number of n128 sub-tiles");
#define NSUB (BN / 128)
#endif
#if EPI == 1
static_assert(BN == 256, "the SwiGLU epilogue covers 128 gate + 128 up columns per CTA");
static_assert(NT % 2 == 0, "gate and up halves of the warp tile");
#endif

#include "common.cuh"

// 16-byte async copy; src_bytes == 0 zero-fills the destination without reading global memory.
__device__ __forceinline__ void cp_async_16(u32 dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_4(u32 dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

__device__ __forceinline__ void mma_e4m3(float* d, const u32* a, const u32* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Byte offset of 16-byte chunk c (0..7) of row r in a [rows][128 B] tile, XOR-swizzled so that
// ldmatrix reading 8 rows of one chunk column hits 8 different bank groups.
__device__ __forceinline__ u32 swz(int r, int c) { return r * BK + ((c ^ (r & 7)) << 4); }

extern "C" __global__ void __launch_bounds__(NTHREADS, 1)
    grouped_gemm_fp8(const unsigned char* __restrict__ A, const float* __restrict__ SA,
                     const unsigned char* __restrict__ B, const float* __restrict__ SB,
                     const int* __restrict__ counts, void* __restrict__ out,
                     float* __restrict__ out_scales, const float* __restrict__ row_weights,
                     const long long* __restrict__ row_token, int M, int N, int K, int G) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  float* scales_smem = reinterpret_cast<float*>(smem + STAGES * STAGE_BYTES);

  const int n_tiles = N / ((EPI == 1) ? 256 : BN);
  const int m_tile = blockIdx.x / n_tiles;
  const int n_tile = blockIdx.x % n_tiles;
  int g, row0, rows;
  if (!find_tile<BM>(counts, G, m_tile, g, row0, rows)) return;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp / WN;
  const int wn = warp % WN;
  const int KB = K / BK;
  const int NB = N / 128;

  const unsigned char* Bg = B + (u64)g * N * K;
  const float* SBg = SB + (u64)g * NB * KB;

  // Global row of B feeding shared-memory row r of the B tile.
#if EPI == 1
  const int I = N / 2;
  const int ch0 = n_tile * 128;  // first intermediate channel of this CTA
  auto b_row = [&](int r) {
    const int w = r / WTN, within = r % WTN, half = WTN / 2;
    return within < half ? ch0 + w * half + within : I + ch0 + w * half + within - half;
  };
  const float* sb_gate = SBg + (u64)(ch0 / 128) * KB;
  const float* sb_up = SBg + (u64)((I + ch0) / 128) * KB;
#else
  const int n0 = n_tile * BN;
  auto b_row = [&](int r) { return n0 + r; };
  const float* sb_gate = SBg + (u64)(n0 / 128) * KB;
  const float* sb_up = sb_gate;
#endif

  auto load_stage = [&](int slot, int kb) {
    unsigned char* sA = smem + slot * STAGE_BYTES;
    unsigned char* sB = sA + A_STAGE_BYTES;
    float* sS = scales_smem + slot * BM;
    const u32 a_base = smem_addr(sA);
    const u32 b_base = smem_addr(sB);
#pragma unroll
    for (int i = 0; i < (BM * 8 + NTHREADS - 1) / NTHREADS; ++i) {
      const int idx = tid + i * NTHREADS;
      if ((BM * 8) % NTHREADS != 0 && idx >= BM * 8) break;
      const int r = idx >> 3, c = idx & 7;
      const bool ok = r < rows;
      const unsigned char* src = ok ? A + (u64)(row0 + r) * K + kb * BK + c * 16 : A;
      cp_async_16(a_base + swz(r, c), src, ok ? 16 : 0);
    }
#pragma unroll
    for (int i = 0; i < (BN * 8) / NTHREADS; ++i) {
      const int idx = tid + i * NTHREADS;
      const int r = idx >> 3, c = idx & 7;
      const unsigned char* src = Bg + (u64)b_row(r) * K + kb * BK + c * 16;
      cp_async_16(b_base + swz(r, c), src, 16);
    }
    if (tid < BM) {
      const bool ok = tid < rows;
      const float* src = ok ? SA + (u64)(row0 + tid) * KB + kb : SA;
      cp_async_4(smem_addr(sS + tid), src, ok ? 4 : 0);
    }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KB) load_stage(s, s);
    cp_async_commit();
  }

#if WGMMA
  // Warpgroup wg multiplies rows [64 wg, 64 wg + 64) of the tile by the BN columns, one n128
  // sub-tile at a time into the same 64 partial registers, then promotes them into acc.
  const int wg = warp >> 2;
  for (int kb = 0; kb < KB; ++kb) {
    float sbv[NSUB];
#pragma unroll
    for (int sub = 0; sub < NSUB; ++sub)
      sbv[sub] = __ldg((EPI == 1 ? (sub ? sb_up : sb_gate) : sb_gate + sub * KB) + kb);
    cp_async_wait<STAGES - 2>();
    fence_proxy_async();  // make this thread's cp.async writes visible to the tensor cores
    __syncthreads();
    {
      const int nk = kb + STAGES - 1;
      if (nk < KB) load_stage(nk % STAGES, nk);
      cp_async_commit();
    }
    const int slot = kb % STAGES;
    const u32 a_base = smem_addr(smem + slot * STAGE_BYTES);
    const u32 b_base = a_base + A_STAGE_BYTES;
    const float* sS = scales_smem + slot * BM;
    const float sa0 = sS[warp * 16 + (lane >> 2)], sa1 = sS[warp * 16 + (lane >> 2) + 8];
    const u64 da = wgmma_desc(a_base + wg * 64 * BK);
#pragma unroll
    for (int sub = 0; sub < NSUB; ++sub) {
      float part[64];
      const u64 db = wgmma_desc(b_base + sub * 128 * BK);
      fence_regs<64>(part);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < BK / 32; ++ks) wgmma_m64n128k32(part, da + 2 * ks, db + 2 * ks, ks);
      wgmma_commit();
      wgmma_wait0();
      fence_regs<64>(part);
      const float s0 = sa0 * sbv[sub], s1 = sa1 * sbv[sub];
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        acc[0][sub * 16 + j][0] += part[4 * j + 0] * s0;
        acc[0][sub * 16 + j][1] += part[4 * j + 1] * s0;
        acc[0][sub * 16 + j][2] += part[4 * j + 2] * s1;
        acc[0][sub * 16 + j][3] += part[4 * j + 3] * s1;
      }
    }
  }
#else
  // ldmatrix lane roles: matrix q = lane / 8, row within it = lane % 8.
  const int q = lane >> 3, r8 = lane & 7;

  for (int kb = 0; kb < KB; ++kb) {
    const float sbg = __ldg(sb_gate + kb);
    const float sbu = __ldg(sb_up + kb);
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    {
      const int nk = kb + STAGES - 1;
      if (nk < KB) load_stage(nk % STAGES, nk);
      cp_async_commit();
    }
    const int slot = kb % STAGES;
    const unsigned char* sA = smem + slot * STAGE_BYTES;
    const unsigned char* sB = sA + A_STAGE_BYTES;
    const float* sS = scales_smem + slot * BM;
    const u32 a_base = smem_addr(sA);
    const u32 b_base = smem_addr(sB);

    float part[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int v = 0; v < 4; ++v) part[i][j][v] = 0.f;

#pragma unroll
    for (int ks = 0; ks < BK / 32; ++ks) {
      u32 af[MT][4];
      u32 bfr[NT][2];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const int r = wm * WTM + i * 16 + (q & 1) * 8 + r8;
        ldmatrix_x4(a_base + swz(r, ks * 2 + (q >> 1)), af[i][0], af[i][1], af[i][2], af[i][3]);
      }
#pragma unroll
      for (int j = 0; j < NT; j += 2) {
        const int r = wn * WTN + j * 8 + (q >> 1) * 8 + r8;
        ldmatrix_x4(b_base + swz(r, ks * 2 + (q & 1)), bfr[j][0], bfr[j][1], bfr[j + 1][0],
                    bfr[j + 1][1]);
      }
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) mma_e4m3(part[i][j], af[i], bfr[j]);
    }

    // Promotion: acc += part * sa[row] * sb.
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      const int r = wm * WTM + i * 16 + (lane >> 2);
      const float sa0 = sS[r], sa1 = sS[r + 8];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const float sb = (EPI == 1 && j >= NT / 2) ? sbu : sbg;
        const float s0 = sa0 * sb, s1 = sa1 * sb;
        acc[i][j][0] += part[i][j][0] * s0;
        acc[i][j][1] += part[i][j][1] * s0;
        acc[i][j][2] += part[i][j][2] * s1;
        acc[i][j][3] += part[i][j][3] * s1;
      }
    }
  }
#endif
  cp_async_wait<0>();

  // ---------------------------------------------------------------- epilogues
#if EPI == 0
  {
    unsigned short* C = reinterpret_cast<unsigned short*>(out);
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      const int r = wm * WTM + i * 16 + (lane >> 2);
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int n = n0 + wn * WTN + j * 8 + (lane & 3) * 2;
        if (r < rows)
          *reinterpret_cast<u32*>(C + (u64)(row0 + r) * N + n) =
              pack_bf16x2(acc[i][j][0], acc[i][j][1]);
        if (r + 8 < rows)
          *reinterpret_cast<u32*>(C + (u64)(row0 + r + 8) * N + n) =
              pack_bf16x2(acc[i][j][2], acc[i][j][3]);
      }
    }
  }
#elif EPI == 2
  {
    float* C = reinterpret_cast<float*>(out);
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = wm * WTM + i * 16 + (lane >> 2) + h * 8;
        if (r < rows) {
          const float w = row_weights[row0 + r];
          float* dst = C + (u64)row_token[row0 + r] * N + n0 + wn * WTN + (lane & 3) * 2;
#pragma unroll
          for (int j = 0; j < NT; ++j)
            red_add_v2(dst + j * 8, acc[i][j][2 * h] * w, acc[i][j][2 * h + 1] * w);
        }
      }
    }
  }
#else  // EPI == 1: h = silu(gate) * up, then per-row e4m3 quantization over the 128 channels.
  {
    __shared__ float row_amax[BM][WN];
    float amax[MT][2];  // h overwrites the gate half of acc
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      amax[i][0] = 0.f;
      amax[i][1] = 0.f;
#pragma unroll
      for (int j = 0; j < NT / 2; ++j)
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          const float gte = acc[i][j][v];
          const float up = acc[i][j + NT / 2][v];
          const float h = gte / (1.f + __expf(-gte)) * up;
          acc[i][j][v] = h;
          amax[i][v >> 1] = fmaxf(amax[i][v >> 1], fabsf(h));
        }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float m = amax[i][h];
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
        if ((lane & 3) == 0) row_amax[wm * WTM + i * 16 + (lane >> 2) + h * 8][wn] = m;
      }
    }
    __syncthreads();
    unsigned char* H8 = reinterpret_cast<unsigned char*>(out);
    const int IB = I / 128;
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = wm * WTM + i * 16 + (lane >> 2) + h * 8;
        float m = 0.f;
#pragma unroll
        for (int w = 0; w < WN; ++w) m = fmaxf(m, row_amax[r][w]);
        const float scale = fmaxf(m, 1e-12f) / 448.f;
        if (r < rows) {
          unsigned char* dst = H8 + (u64)(row0 + r) * I + ch0 + wn * (WTN / 2) + (lane & 3) * 2;
#pragma unroll
          for (int j = 0; j < NT / 2; ++j)
            *reinterpret_cast<unsigned short*>(dst + j * 8) =
                pack_e4m3x2(acc[i][j][2 * h] / scale, acc[i][j][2 * h + 1] / scale);
          if (wn == 0 && (lane & 3) == 0) out_scales[(u64)(row0 + r) * IB + n_tile] = scale;
        }
      }
    }
  }
#endif
}
