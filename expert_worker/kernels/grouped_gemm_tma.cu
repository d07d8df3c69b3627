// FP8 (e4m3) grouped GEMM with DeepSeek-V3 block scaling, v3: TMA loads into an mbarrier ring,
// a producer warp, BM/64 consumer warpgroups (wgmma), persistent grid.
//
// Operands, math and epilogues are those of grouped_gemm.cu (read its header):
//   C[r, n] = sum_kb  sa[r, kb] * sb[g, n / 128, kb] * sum_{k in block kb} A[r, k] * B[g, n, k]
//
// Structure:
//   - Warpgroups 0 .. BM/64 - 1 consume. Warpgroup w multiplies rows [64 w, 64 w + 64) of the
//     tile by the BN columns with wgmma m64n128k32, one n128 sub-tile at a time into 64 partial
//     registers, and promotes each into the fp32 accumulator (acc += part * sa[row] * sb). With
//     two consumer warpgroups the tensor cores run one warpgroup's wgmma while the other waits
//     and promotes (the accumulator, 64 partials and a second partial set would not fit in 232
//     registers at BN = 256).
//   - The last warpgroup produces: it hands most of its registers to the consumers (setmaxnreg)
//     and one thread issues, per k-block, the TMA copies of the A tile (BM rows x 128 bytes) and
//     the B tile (BN / 128 boxes of 128 rows) into stage s of the ring, 128-byte swizzle (the
//     layout the wgmma descriptor reads), completing on full[s]. Consumers free a stage by
//     arriving on empty[s] once their wgmma has read it.
//   - Persistent: one CTA per SM at most; CTA b takes tiles b, b + gridDim.x, ... in the
//     order (m-tile, n-tile), n fastest: CTAs that run at the same time share the A rows and walk
//     the same group's weights together, so each weight tile is read from HBM about once.
//     The producer starts the next tile while the consumers run the current tile's epilogue.
//   - MCAST = 2 (measured slower on H100 so far, docs/kernels.md), clusters of two CTAs
//     ("units" of two tiles). MCAST_B = 0: the two take adjacent
//     n-tiles of one m-tile; each loads half of the A tile and multicasts it into both (40
//     instead of 48 KB per k-block from L2 at BN = 256). MCAST_B = 1: the two take adjacent
//     m-tiles of one group (a 256-row super-tile) and one n-tile; each loads one n128 half of the
//     B tile and multicasts it (32 KB per k-block). A CTA whose m-tile lies past its group's
//     rows only helps load B. Either way a stage is free only when the consumers of both CTAs
//     have read it: each consumer warp arrives on the empty barrier of both CTAs.
//   - Ragged groups: the A box at the tile's first row reads past the group's end (those rows
//     are computed and never stored) and past M (TMA fills zeros). The activation and weight
//     scales are read by the consumers from global memory (L2), one k-block ahead, or with
//     SSMEM from shared memory, where the producer staged them with the stage.
//
// Compile-time configuration (NVRTC -D options):
//   BM      64 or 128 rows per tile (one consumer warpgroup per 64 rows)
//   BN      128 or 256 output columns per tile (EPI == 1: 128 gate + 128 up, BN == 256)
//   STAGES  depth of the TMA ring
//   EPI     0: bf16 C [M, N]; 1: SwiGLU + per-row FP8 requantization; 2: weighted float32
//           scatter-add (see grouped_gemm.cu)
//   MCAST   1, or 2: clusters of two CTAs share a tile by TMA multicast
//   MCAST_B 0: the cluster shares A (needs N / BN even); 1: the cluster shares B (BN == 256)
//   CHUNK   128: each warpgroup multiplies an n128 sub-tile into 64 partial registers, waits and
//           promotes, twice per k-block at BN = 256 (the tensor cores stay busy only through the
//           other warpgroup). 64: software-pipelined n64 chunks: wgmma m64n64k32 into one of two
//           32-register partial sets while the other set is promoted, so each warpgroup keeps a
//           chunk in flight across its own promotion (wait_group 1) within the k-block. Scales
//           as at 128: from global memory one k-block ahead, or with SSMEM from the stage's slot.
//   AREG    1 (CHUNK 128 only): each consumer warp loads its 16 rows of the A tile from shared
//           memory into registers once per k-block (ldmatrix, the mma.m16n8k32 fragment, which
//           is also wgmma's register fragment of A) and both n128 halves take A from there
//           (wgmma RS form): 8 KB instead of 16 KB of A read from shared memory per warpgroup
//           per k-block, for 16 more registers per thread.
//   SSMEM   1 (no clusters, either CHUNK): the producer warp also stages each k-block's scales
//           in shared memory (a slot per stage: BM row scales of A, NSUB block scales of B, next
//           to the ring), and the consumers read them there after the stage's full barrier and
//           before they free the stage (the producer then reuses the slot), in place of four
//           global loads per thread per k-block.
//   PROBE   timing experiments only, results are wrong (never in CONFIGS): 1 skips the promotion
//           but for the last k-block, 2 loads each stage of the ring once (the first tile) and
//           then only signals it, 3 makes the consumers wait for and free each stage without
//           any wgmma. They separate the cost of the promotion, of the operand feed and of the
//           math (docs/kernels.md).

#include "common.cuh"

#ifndef BM
#define BM 128
#endif
#ifndef BN
#define BN 256
#endif
#ifndef STAGES
#define STAGES 4
#endif
#ifndef EPI
#define EPI 0
#endif
#ifndef MCAST
#define MCAST 1
#endif
#ifndef MCAST_B
#define MCAST_B 0
#endif
#ifndef CHUNK
#define CHUNK 128
#endif
#ifndef AREG
#define AREG 0
#endif
#ifndef SSMEM
#define SSMEM 0
#endif
#ifndef PROBE
#define PROBE 0
#endif

#define BK 128
#define CONSUMERS (BM / 64)                  // consumer warpgroups
#define NTHREADS ((CONSUMERS + 1) * 128)     // + the producer warpgroup
#define NSUB (BN / 128)                      // n128 sub-tiles
#define A_BYTES (BM * BK)
#define B_BYTES (BN * BK)
#define STAGE_BYTES (A_BYTES + B_BYTES)      // multiple of 1024: stages stay swizzle-aligned
#define SHARE_A (MCAST > 1 && !MCAST_B)
#define SHARE_B (MCAST > 1 && MCAST_B)
#define A_BOX_ROWS (SHARE_A ? BM / MCAST : BM)  // rows of A each CTA of a cluster loads

static_assert(BM == 64 || BM == 128, "BM: one or two consumer warpgroups");
static_assert(BN == 128 || BN == 256, "BN: one or two n128 sub-tiles");
static_assert(EPI != 1 || BN == 256, "the SwiGLU epilogue covers 128 gate + 128 up columns");
static_assert(MCAST == 1 || MCAST == 2, "MCAST: one CTA, or clusters of two");
static_assert(!SHARE_B || NSUB % MCAST == 0, "sharing B: each CTA loads NSUB / MCAST n128 halves");
static_assert(CHUNK == 128 || (CHUNK == 64 && BN == 256), "CHUNK 64: four n64 chunks per k-block");
static_assert(!AREG || CHUNK == 128, "AREG: A from registers for the n128 sub-tiles");
static_assert(!SSMEM || (MCAST == 1 && PROBE == 0), "SSMEM: no clusters, no timing probes");
#define SCALE_SLOT (BM + 4)  // floats per stage of staged scales: BM of A, NSUB (<= 2) of B

// Registers per thread after setmaxnreg (two consumer warpgroups): 40 x 128 + 232 x 256 <= 64K.
#define PRODUCER_REGS 40
#define CONSUMER_REGS 232

struct __align__(64) TensorMap {  // CUtensorMap, made on the host by cuTensorMapEncodeTiled
  u64 opaque[16];
};

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}

// Expect `bytes` more on the barrier's current phase, without arriving.
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}

// Spin until the phase with the given parity of the barrier has completed.
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
  u32 done;
  do {
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// TMA: box at (x = byte column, y = row) of the tensor map -> shared memory, completes on bar.
__device__ __forceinline__ void tma_load_2d(u32 dst, const TensorMap* map, u32 bar, int x, int y) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<u64>(map)), "r"(x), "r"(y), "r"(bar)
      : "memory");
}

// The same, written into the same shared-memory offset of every CTA in `mask` (cluster ranks),
// completing on the barrier at the same offset in each of them.
__device__ __forceinline__ void tma_load_2d_multicast(u32 dst, const TensorMap* map, u32 bar, int x,
                                                      int y, unsigned short mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
      "l"(reinterpret_cast<u64>(map)), "r"(x), "r"(y), "r"(bar), "h"(mask)
      : "memory");
}

__device__ __forceinline__ u32 cluster_rank() {
  u32 r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}

// Every thread of every CTA of the cluster; orders shared-memory accesses across the cluster.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::
                   : "memory");
}

// Arrive on the mbarrier at shared-memory offset `bar` of cluster rank `cta`.
__device__ __forceinline__ void mbar_arrive_cluster(u32 bar, u32 cta) {
  asm volatile(
      "{\n.reg .b32 remote;\nmapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.release.cluster.shared::cluster.b64 _, [remote];\n}\n" ::"r"(bar),
      "r"(cta)
      : "memory");
}

__device__ __forceinline__ void prefetch_tensor_map(const TensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<u64>(map)) : "memory");
}

// Row of the [G * N, K] weight view where n128 sub-tile `sub` of tile n_tile of group g starts.
__device__ __forceinline__ int b_row(int g, int n_tile, int sub, int N) {
#if EPI == 1
  return g * N + sub * (N / 2) + n_tile * 128;  // gate rows, then the matching up rows
#else
  return g * N + n_tile * BN + sub * 128;
#endif
}

// This CTA's tile of `unit` (units_per_m units per m-tile or super-tile): group g, first row,
// rows (<= 0: no rows here, the CTA only helps load the shared B tile), n_tile. False past the
// last unit. Uniform over the warp.
__device__ __forceinline__ bool unit_tile(const int* __restrict__ counts, int G, int unit,
                                          int units_per_m, int rank, int& g, int& row0, int& rows,
                                          int& n_tile) {
#if SHARE_B
  if (!find_tile<MCAST * BM>(counts, G, unit / units_per_m, g, row0, rows)) return false;
  row0 += rank * BM;
  rows -= rank * BM;
  n_tile = unit % units_per_m;
#else
  if (!find_tile<BM>(counts, G, unit / units_per_m, g, row0, rows)) return false;
  n_tile = (unit % units_per_m) * MCAST + rank;
#endif
  return true;
}

// SSMEM: the k-block's scales of this tile into a slot, one lane's share: BM activation row
// scales (rows past M read row M - 1; their results are never stored), then NSUB weight block
// scales.
__device__ __forceinline__ void stage_scales(float* slot, const float* __restrict__ SA,
                                             const float* __restrict__ SB, int lane, int row0,
                                             int g, int n_tile, int kb, int M, int N, int KB) {
#pragma unroll
  for (int i = 0; i < BM / 32; ++i) {
    const int r = lane + 32 * i;
    slot[r] = __ldg(SA + (u64)min(row0 + r, M - 1) * KB + kb);
  }
  if (lane < NSUB) slot[BM + lane] = __ldg(SB + (u64)(b_row(g, n_tile, lane, N) / 128) * KB + kb);
}

// SSMEM: a consumer thread's scales from a stage's slot: its rows r_lo and r_lo + 8, the NSUB
// weight blocks. Read after the stage's full barrier and before the stage is released.
__device__ __forceinline__ void slot_scales(const float* slot, int r_lo, float& sa0, float& sa1,
                                            float* sb) {
  sa0 = slot[r_lo];
  sa1 = slot[r_lo + 8];
#pragma unroll
  for (int sub = 0; sub < NSUB; ++sub) sb[sub] = slot[BM + sub];
}

// Producer warp: per tile and k-block, wait for a free stage, then TMA the A and B tiles into it.
// Lane 0 issues; the whole warp walks the tiles (find_tile is a warp-wide scan).
__device__ __forceinline__ void produce(const TensorMap* map_a, const TensorMap* map_b,
                                        const int* __restrict__ counts, u32 ring, u32 full_bar,
                                        u32 empty_bar, int N, int K, int G,
                                        const float* __restrict__ SA, const float* __restrict__ SB,
                                        float* scales_smem, int M) {
  const int lane = threadIdx.x & 31;
  const int units = N / BN / (SHARE_A ? MCAST : 1), KB = K / BK;  // units per m-tile
  const int rank = MCAST > 1 ? cluster_rank() : 0;
  int s = 0, phase = 0;
  // PROBE 2: the first tile fills the ring, later stages are only signalled
  [[maybe_unused]] bool first = true;
  for (int unit = blockIdx.x / MCAST;; unit += gridDim.x / MCAST) {
    int g, row0, rows, n_tile;
    if (!unit_tile(counts, G, unit, units, rank, g, row0, rows, n_tile)) break;
    const bool alive = rows > 0;
    // Lane 0 posts each stage's bytes and issues its TMA copies. With SSMEM the whole warp also
    // stages the k-block's scales and then arrives (full[s] counts 32 arrivals), which
    // publishes them with the stage; otherwise the other lanes wait at the __syncwarp below.
    if (SSMEM || lane == 0) {
      for (int kb = 0; kb < KB; ++kb) {
        mbar_wait(empty_bar + 8 * s, phase ^ 1);  // a fresh barrier passes parity 1 at once
        const u32 dst = ring + s * STAGE_BYTES, bar = full_bar + 8 * s;
        if (PROBE == 2 && !(first && kb < STAGES)) {
          mbar_arrive(bar);
        } else if (lane == 0) {
          // Bytes landing here: all of A (both halves when shared) unless no rows, all of B.
          // SSMEM: the arrivals come after the scales, so only the bytes are posted here.
          if (SSMEM)
            mbar_expect_tx(bar, STAGE_BYTES);
          else
            mbar_arrive_expect_tx(bar, alive ? STAGE_BYTES : B_BYTES);
#if SHARE_A
          tma_load_2d_multicast(dst + rank * A_BOX_ROWS * BK, map_a, bar, kb * BK,
                                row0 + rank * A_BOX_ROWS, (1 << MCAST) - 1);
#else
          if (alive) tma_load_2d(dst, map_a, bar, kb * BK, row0);
#endif
#if SHARE_B
#pragma unroll
          for (int sub = rank; sub < NSUB; sub += MCAST)
            tma_load_2d_multicast(dst + A_BYTES + sub * 128 * BK, map_b, bar, kb * BK,
                                  b_row(g, n_tile, sub, N), (1 << MCAST) - 1);
#else
#pragma unroll
          for (int sub = 0; sub < NSUB; ++sub)
            tma_load_2d(dst + A_BYTES + sub * 128 * BK, map_b, bar, kb * BK,
                        b_row(g, n_tile, sub, N));
#endif
        }
        if (SSMEM) {
          stage_scales(scales_smem + s * SCALE_SLOT, SA, SB, lane, row0, g, n_tile, kb, M, N, KB);
          mbar_arrive(bar);
        }
        if (++s == STAGES) {
          s = 0;
          phase ^= 1;
        }
      }
    }
    first = false;
    __syncwarp();
  }
}

// A consumer warp is done with a stage: free it here and, in a cluster, in the other CTA whose
// multicast wrote into it.
__device__ __forceinline__ void release(u32 empty, int lane) {
#if MCAST > 1
  if (lane < MCAST) mbar_arrive_cluster(empty, lane);
#else
  if (lane == 0) mbar_arrive(empty);
#endif
}

// CHUNK 64: issue chunk c (columns 64 c .. 64 c + 63 of the tile) of the stage at `stage` into
// the partial set p: four wgmma m64n64k32 over the k-block, one commit group.
__device__ __forceinline__ void issue_n64(float* p, u32 stage, int wg, int c) {
  const u64 da = wgmma_desc(stage + wg * 64 * BK);
  const u64 db = wgmma_desc(stage + A_BYTES + c * 64 * BK);  // 64 rows of 128 bytes: 8 KB
  fence_regs<32>(p);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < BK / 32; ++ks) wgmma_m64n64k32(p, da + 2 * ks, db + 2 * ks, ks);
  wgmma_commit();  // no register fence here: p belongs to the wgmma until a wait covers it
}

// acc[32 C + 4 j + v] += p[4 j + v] * (v < 2 ? s0 : s1): the layout of acc is that of the n128
// path (acc[sub * 64 + 4 j' + v], j' = 8 (C & 1) + j), so the epilogues are shared.
template <int C>
__device__ __forceinline__ void promote_n64(float* acc, const float* p, float s0, float s1) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    acc[32 * C + 4 * j + 0] += p[4 * j + 0] * s0;
    acc[32 * C + 4 * j + 1] += p[4 * j + 1] * s0;
    acc[32 * C + 4 * j + 2] += p[4 * j + 2] * s1;
    acc[32 * C + 4 * j + 3] += p[4 * j + 3] * s1;
  }
}

// CHUNK 64: one k-block (stage s). Chunks 0..3 go alternately into p0 and p1; each is issued
// before the previous one is waited for and promoted, so three of the four promotions run while
// this warpgroup's next chunk is on the tensor cores (the fourth overlaps the other warpgroup's
// wgmma only). Nothing stays in flight past the k-block: ptxas follows wait_group 1 only within
// straight-line code and serialises every wgmma of the kernel otherwise (warning C7514).
// Frees stage s and advances (s, phase). Scales (sa0, sa1, sb): from global memory, this
// k-block's on entry and the next one's on exit; SSMEM: read from stage s's slot (scales_smem,
// rows r_lo and r_lo + 8) once it is full, and all used before the stage is freed.
__device__ __forceinline__ void kblock_n64(float* acc, float* p0, float* p1, u32 ring, u32 full_bar,
                                           u32 empty_bar, int& s, int& phase, int wg, int lane,
                                           int kb, int KB, const float* sa_lo, const float* sa_hi,
                                           const float* const* sb_row,
                                           [[maybe_unused]] const float* scales_smem,
                                           [[maybe_unused]] int r_lo, float& sa0, float& sa1,
                                           float* sb) {
#if !SSMEM
  // Next k-block's scales, loaded while this one multiplies.
  const int kn = kb + 1 < KB ? kb + 1 : kb;
  const float nsa0 = __ldg(sa_lo + kn), nsa1 = __ldg(sa_hi + kn);
  const float nsb0 = __ldg(sb_row[0] + kn), nsb1 = __ldg(sb_row[1] + kn);
#endif
  const bool promote = PROBE != 1 || kb == KB - 1;
  const u32 stage = ring + s * STAGE_BYTES;
  mbar_wait(full_bar + 8 * s, phase);
#if SSMEM
  slot_scales(scales_smem + s * SCALE_SLOT, r_lo, sa0, sa1, sb);  // this k-block's, staged
#endif
  issue_n64(p0, stage, wg, 0);
  issue_n64(p1, stage, wg, 1);
  wgmma_wait1();
  fence_regs<32>(p0);
  if (promote) promote_n64<0>(acc, p0, sa0 * sb[0], sa1 * sb[0]);
  issue_n64(p0, stage, wg, 2);
  wgmma_wait1();
  fence_regs<32>(p1);
  if (promote) promote_n64<1>(acc, p1, sa0 * sb[0], sa1 * sb[0]);
  issue_n64(p1, stage, wg, 3);
  wgmma_wait1();
  fence_regs<32>(p0);
  if (promote) promote_n64<2>(acc, p0, sa0 * sb[1], sa1 * sb[1]);
  wgmma_wait0();
  fence_regs<32>(p1);
  release(empty_bar + 8 * s, lane);  // all four chunks of this stage (and its scales) are read
  if (promote) promote_n64<3>(acc, p1, sa0 * sb[1], sa1 * sb[1]);
  if (++s == STAGES) {
    s = 0;
    phase ^= 1;
  }
#if !SSMEM
  sa0 = nsa0;
  sa1 = nsa1;
  sb[0] = nsb0;
  sb[1] = nsb1;
#endif
}

// AREG: this warp's 16 rows of the stage's A tile (BK = 128 bytes each, 128-byte swizzle: chunk
// c of row r at c ^ (r & 7)) -> a[ks][0..3], the register fragment of k32 step ks: rows
// (lane / 4, + 8) x bytes (4 (lane % 4) .. + 3, + 16). ldmatrix.x4 matrix q = lane / 8 reads rows
// (q & 1) * 8 .. + 7 of chunk 2 ks + (q >> 1).
__device__ __forceinline__ void load_a_frags(u32 (&a)[BK / 32][4], u32 stage, int wg, int warp,
                                             int lane) {
  const int q = lane >> 3;
  const int r = wg * 64 + (warp & 3) * 16 + (q & 1) * 8 + (lane & 7);
#pragma unroll
  for (int ks = 0; ks < BK / 32; ++ks) {
    const u32 addr = stage + r * BK + (((ks * 2 + (q >> 1)) ^ (r & 7)) << 4);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(a[ks][0]), "=r"(a[ks][1]), "=r"(a[ks][2]), "=r"(a[ks][3])
                 : "r"(addr)
                 : "memory");
  }
}

// Consumer warpgroups: per tile, multiply and promote every k-block, then run the epilogue.
__device__ __forceinline__ void consume(const float* __restrict__ SA, const float* __restrict__ SB,
                                        const int* __restrict__ counts, void* __restrict__ out,
                                        float* __restrict__ out_scales,
                                        const float* __restrict__ row_weights,
                                        const long long* __restrict__ row_token, u32 ring,
                                        u32 full_bar, u32 empty_bar, int M, int N, int K, int G,
                                        const float* scales_smem) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int units = N / BN / (SHARE_A ? MCAST : 1), KB = K / BK;
  const int rank = MCAST > 1 ? cluster_rank() : 0;
  const int wg = warp >> 2;
  const int r_lo = wg * 64 + (warp & 3) * 16 + (lane >> 2);  // this thread's rows: r_lo, r_lo + 8
  int s = 0, phase = 0;
  for (int unit = blockIdx.x / MCAST;; unit += gridDim.x / MCAST) {
    int g, row0, rows, n_tile;
    if (!unit_tile(counts, G, unit, units, rank, g, row0, rows, n_tile)) break;
    const bool alive = rows > 0;

    // Scale rows; tile rows past M read row M - 1 (their results are never stored).
    const float* sa_lo = SA + (u64)min(row0 + r_lo, M - 1) * KB;
    const float* sa_hi = SA + (u64)min(row0 + r_lo + 8, M - 1) * KB;
    [[maybe_unused]] const float* sb_row[NSUB];
#pragma unroll
    for (int sub = 0; sub < NSUB; ++sub)
      sb_row[sub] = SB + (u64)(b_row(g, n_tile, sub, N) / 128) * KB;

    float acc[NSUB * 64];
#pragma unroll
    for (int i = 0; i < NSUB * 64; ++i) acc[i] = 0.f;
    float sa0, sa1, sb[NSUB];
#if !SSMEM
    sa0 = __ldg(sa_lo);
    sa1 = __ldg(sa_hi);
#pragma unroll
    for (int sub = 0; sub < NSUB; ++sub) sb[sub] = __ldg(sb_row[sub]);
#endif

#if CHUNK == 64
    if (PROBE != 3 && alive) {
      float p0[32], p1[32];
      for (int kb = 0; kb < KB; ++kb)
        kblock_n64(acc, p0, p1, ring, full_bar, empty_bar, s, phase, wg, lane, kb, KB, sa_lo,
                   sa_hi, sb_row, scales_smem, r_lo, sa0, sa1, sb);
    } else {
      for (int kb = 0; kb < KB; ++kb) {  // no rows here: the stage only carried B for the other CTA
        mbar_wait(full_bar + 8 * s, phase);
        release(empty_bar + 8 * s, lane);
        if (++s == STAGES) {
          s = 0;
          phase ^= 1;
        }
      }
    }
#else
    for (int kb = 0; kb < KB; ++kb) {
#if SSMEM
      mbar_wait(full_bar + 8 * s, phase);
      slot_scales(scales_smem + s * SCALE_SLOT, r_lo, sa0, sa1, sb);  // this k-block's, staged
#else
      // Next k-block's scales, loaded while this one multiplies.
      const int kn = kb + 1 < KB ? kb + 1 : kb;
      const float nsa0 = __ldg(sa_lo + kn), nsa1 = __ldg(sa_hi + kn);
      float nsb[NSUB];
#pragma unroll
      for (int sub = 0; sub < NSUB; ++sub) nsb[sub] = __ldg(sb_row[sub] + kn);

      mbar_wait(full_bar + 8 * s, phase);
#endif
      const u32 stage = ring + s * STAGE_BYTES;
      const u64 da = wgmma_desc(stage + wg * 64 * BK);
#if AREG
      u32 af[BK / 32][4];
      if (alive && PROBE != 3) load_a_frags(af, stage, wg, warp, lane);
#endif
#pragma unroll
      for (int sub = 0; sub < NSUB; ++sub) {
        if (!alive || PROBE == 3) break;  // no rows here: the stage only carried B for the other CTA
        float part[64];
        const u64 db = wgmma_desc(stage + A_BYTES + sub * 128 * BK);
        fence_regs<64>(part);
        wgmma_fence();
#if AREG
#pragma unroll
        for (int ks = 0; ks < BK / 32; ++ks) wgmma_m64n128k32_rs(part, af[ks], db + 2 * ks, ks);
#else
#pragma unroll
        for (int ks = 0; ks < BK / 32; ++ks) wgmma_m64n128k32(part, da + 2 * ks, db + 2 * ks, ks);
#endif
        wgmma_commit();
        wgmma_wait0();
        fence_regs<64>(part);
        if (sub == NSUB - 1) release(empty_bar + 8 * s, lane);  // stage read
        const float s0 = sa0 * sb[sub], s1 = sa1 * sb[sub];
        if (PROBE == 1 && kb < KB - 1) continue;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          acc[sub * 64 + 4 * j + 0] += part[4 * j + 0] * s0;
          acc[sub * 64 + 4 * j + 1] += part[4 * j + 1] * s0;
          acc[sub * 64 + 4 * j + 2] += part[4 * j + 2] * s1;
          acc[sub * 64 + 4 * j + 3] += part[4 * j + 3] * s1;
        }
      }
      if (!alive || PROBE == 3) release(empty_bar + 8 * s, lane);
      if (++s == STAGES) {
        s = 0;
        phase ^= 1;
      }
#if !SSMEM
      sa0 = nsa0;
      sa1 = nsa1;
#pragma unroll
      for (int sub = 0; sub < NSUB; ++sub) sb[sub] = nsb[sub];
#endif
    }
#endif

    // -------------------------------------------------------------------------- epilogues
    // acc[sub * 64 + 4 j + v]: row r_lo (v = 0, 1) or r_lo + 8 (v = 2, 3), column
    // sub * 128 + j * 8 + (lane & 3) * 2 + (v & 1) of the tile.
#if EPI == 0
    unsigned short* C = reinterpret_cast<unsigned short*>(out);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = r_lo + 8 * h;
      if (r < rows) {
        unsigned short* dst = C + (u64)(row0 + r) * N + n_tile * BN + (lane & 3) * 2;
#pragma unroll
        for (int sub = 0; sub < NSUB; ++sub)
#pragma unroll
          for (int j = 0; j < 16; ++j)
            *reinterpret_cast<u32*>(dst + sub * 128 + j * 8) =
                pack_bf16x2(acc[sub * 64 + 4 * j + 2 * h], acc[sub * 64 + 4 * j + 2 * h + 1]);
      }
    }
#elif EPI == 2
    float* C = reinterpret_cast<float*>(out);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = r_lo + 8 * h;
      if (r < rows) {
        const float w = row_weights[row0 + r];
        float* dst = C + (u64)row_token[row0 + r] * N + n_tile * BN + (lane & 3) * 2;
#pragma unroll
        for (int sub = 0; sub < NSUB; ++sub)
#pragma unroll
          for (int j = 0; j < 16; ++j)
            red_add_v2(dst + sub * 128 + j * 8, acc[sub * 64 + 4 * j + 2 * h] * w,
                       acc[sub * 64 + 4 * j + 2 * h + 1] * w);
      }
    }
#else  // EPI == 1: h = silu(gate) * up over 128 channels, per-row e4m3 quantization.
    // A row's 128 channels live in the four lanes of one quad: two shuffles give its amax.
    const int I = N / 2;
    unsigned char* H8 = reinterpret_cast<unsigned char*>(out);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float m = 0.f;
#pragma unroll
      for (int j = 0; j < 16; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float gte = acc[4 * j + 2 * h + e];
          const float up = acc[64 + 4 * j + 2 * h + e];
          const float hv = gte / (1.f + __expf(-gte)) * up;
          acc[4 * j + 2 * h + e] = hv;
          m = fmaxf(m, fabsf(hv));
        }
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
      const float scale = fmaxf(m, 1e-12f) / 448.f;
      const int r = r_lo + 8 * h;
      if (r < rows) {
        unsigned char* dst = H8 + (u64)(row0 + r) * I + n_tile * 128 + (lane & 3) * 2;
#pragma unroll
        for (int j = 0; j < 16; ++j)
          *reinterpret_cast<unsigned short*>(dst + j * 8) =
              pack_e4m3x2(acc[4 * j + 2 * h] / scale, acc[4 * j + 2 * h + 1] / scale);
        if ((lane & 3) == 0) out_scales[(u64)(row0 + r) * (I / 128) + n_tile] = scale;
      }
    }
#endif
  }
}

#if MCAST > 1
#define CLUSTER_DIMS __cluster_dims__(MCAST, 1, 1)
#else
#define CLUSTER_DIMS
#endif

extern "C" __global__ void CLUSTER_DIMS __launch_bounds__(NTHREADS, 1)
    grouped_gemm_fp8_tma(const __grid_constant__ TensorMap map_a,
                         const __grid_constant__ TensorMap map_b, const float* __restrict__ SA,
                         const float* __restrict__ SB, const int* __restrict__ counts,
                         void* __restrict__ out, float* __restrict__ out_scales,
                         const float* __restrict__ row_weights,
                         const long long* __restrict__ row_token, int M, int N, int K, int G) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  const u32 ring = smem_addr(smem);
  const u32 full_bar = ring + STAGES * STAGE_BYTES;  // STAGES mbarriers of 8 bytes
  const u32 empty_bar = full_bar + STAGES * 8;       // STAGES more
  // SSMEM: STAGES slots of SCALE_SLOT floats after the barriers
  float* scales_smem = reinterpret_cast<float*>(smem + STAGES * STAGE_BYTES + STAGES * 16);
  const int warp = threadIdx.x >> 5;

  if (threadIdx.x == CONSUMERS * 128) {
    prefetch_tensor_map(&map_a);
    prefetch_tensor_map(&map_b);
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full_bar + 8 * s, SSMEM ? 32 : 1);  // the producer's arrive(s) + the TMA bytes
      mbar_init(empty_bar + 8 * s, MCAST * CONSUMERS * 4);  // each consumer warp of the cluster
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    fence_proxy_async();
  }
#if MCAST > 1
  cluster_sync();  // barriers initialised in both CTAs before either signals the other
#else
  __syncthreads();
#endif

  if (warp >= CONSUMERS * 4) {  // producer warpgroup: one warp issues, three idle
#if CONSUMERS > 1
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(PRODUCER_REGS));
#endif
    if (warp == CONSUMERS * 4)
      produce(&map_a, &map_b, counts, ring, full_bar, empty_bar, N, K, G, SA, SB, scales_smem, M);
  } else {  // consumer warpgroups
#if CONSUMERS > 1
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CONSUMER_REGS));
#endif
    consume(SA, SB, counts, out, out_scales, row_weights, row_token, ring, full_bar, empty_bar,
            M, N, K, G, scales_smem);
  }
#if MCAST > 1
  cluster_sync();  // no CTA exits while the other may still arrive on its barriers
#endif
}
