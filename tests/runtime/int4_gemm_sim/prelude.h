// A host simulation of the CUDA features onnxpipe/runtime/kernels/csrc/int4_gemm.cu's kernels use, so that their
// very source runs on a CPU (tests/runtime/test_int4_gemm_sim.py): each CUDA thread is a std::thread; a warp, a block
// and a cluster meet at std::barriers; mma.sync.m16n8k16 is computed by the warp together from its lanes' fragments
// as PTX lays them out; fp16 arithmetic rounds through _Float16; distributed shared memory maps a block's buffer to
// another's at the same offset. Not a GPU model: no timing, no memory ordering beyond the barriers.
#include <barrier>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <functional>
#include <thread>
#include <vector>
#include <memory>
#include <cstdlib>

#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __restrict__ __restrict
#define __CUDA_ARCH__ 900

struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct uint4 { uint32_t x, y, z, w; };
struct uint2 { uint32_t x, y; };
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int min(int a, int b) { return a < b ? a : b; }
struct __half { uint16_t bits; };
struct __half2 { __half x, y; };

inline float h2f(__half h) { _Float16 f; std::memcpy(&f, &h.bits, 2); return (float)f; }
inline __half f2h(float v) { _Float16 f = (_Float16)v; __half h; std::memcpy(&h.bits, &f, 2); return h; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline __half __float2half_rn(float v) { return f2h(v); }
inline float __half2float(__half h) { return h2f(h); }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline __half2 __halves2half2(__half a, __half b) { return {a, b}; }
inline float2 __half22float2(__half2 h) { return {h2f(h.x), h2f(h.y)}; }
inline __half2 __hsub2(__half2 a, __half2 b) { return {f2h(h2f(a.x) - h2f(b.x)), f2h(h2f(a.y) - h2f(b.y))}; }
inline __half2 __hmul2(__half2 a, __half2 b) { return {f2h(h2f(a.x) * h2f(b.x)), f2h(h2f(a.y) * h2f(b.y))}; }
// a * b is exact in float (11-bit significands), so a * b + c is rounded once to float, then to fp16: not always
// the GPU's single rounding, but within one fp16 step of it
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  return {f2h(h2f(a.x) * h2f(b.x) + h2f(c.x)), f2h(h2f(a.y) * h2f(b.y) + h2f(c.y))};
}
inline uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t s) {
  uint8_t b[8]; std::memcpy(b, &x, 4); std::memcpy(b + 4, &y, 4);
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= (uint32_t)b[(s >> (4 * i)) & 7] << (8 * i);
  return r;
}
template <class T> inline T __ldg(const T* p) { return *p; }

struct Sim {  // one launch's shared state
  std::barrier<>* block_bar[64];
  std::barrier<>* cluster_bar;
  std::barrier<>* warp_bar[64][16];
  uint32_t frag[64][16][32][6];  // [block in cluster][warp][lane] a0..a3 b0 b1
  float shfl[64][16][32];        // [block in cluster][warp][lane] a __shfl_xor_sync's values
  std::vector<std::vector<char>> smem;  // per block of the cluster
};
thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
thread_local int sim_rank;  // block's rank in the running cluster
thread_local Sim* sim;

inline void __syncthreads() { sim->block_bar[sim_rank]->arrive_and_wait(); }
inline void* sim_smem() { return sim->smem[sim_rank].data(); }

namespace cooperative_groups {
struct cluster_group {
  void sync() { sim->cluster_bar->arrive_and_wait(); }
  template <class T> T* map_shared_rank(T* p, int r) {
    const char* base = sim->smem[sim_rank].data();
    return reinterpret_cast<T*>(sim->smem[r].data() + (reinterpret_cast<const char*>(p) - base));
  }
};
inline cluster_group this_cluster() { return {}; }
}

// every lane of the warp gives its value, then reads its partner's (the mask: all 32 lanes, as the kernels ask)
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  if (mask != 0xFFFFFFFFu) std::abort();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  sim->shfl[sim_rank][warp][lane] = v;
  sim->warp_bar[sim_rank][warp]->arrive_and_wait();
  const float got = sim->shfl[sim_rank][warp][lane ^ lane_mask];
  sim->warp_bar[sim_rank][warp]->arrive_and_wait();
  return got;
}

inline float hf(uint32_t u, int hi) { return h2f(__half{(uint16_t)(hi ? u >> 16 : u & 0xFFFF)}); }

inline void sim_mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint32_t* f = sim->frag[sim_rank][warp][lane];
  f[0] = a0; f[1] = a1; f[2] = a2; f[3] = a3; f[4] = b0; f[5] = b1;
  sim->warp_bar[sim_rank][warp]->arrive_and_wait();
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const uint32_t* q = sim->frag[sim_rank][warp][l];
    const int g = l / 4, t = l % 4;
    for (int h = 0; h < 2; ++h) {
      A[g][2 * t + h] = hf(q[0], h); A[g + 8][2 * t + h] = hf(q[1], h);
      A[g][2 * t + 8 + h] = hf(q[2], h); A[g + 8][2 * t + 8 + h] = hf(q[3], h);
      B[2 * t + h][g] = hf(q[4], h); B[2 * t + 8 + h][g] = hf(q[5], h);
    }
  }
  const int g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
    float s = 0;
    for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
    c[e] += s;
  }
  sim->warp_bar[sim_rank][warp]->arrive_and_wait();
}

// A launch: the grid run block by block (a cluster's `slices` blocks at once), a std::thread per CUDA thread.
template <class F>
void run_clusters(dim3 grid, int threads, int slices, F kernel) {
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      auto s = std::make_unique<Sim>();
      std::vector<std::unique_ptr<std::barrier<>>> bars;
      for (int r = 0; r < slices; ++r) {
        bars.emplace_back(new std::barrier<>(threads));
        s->block_bar[r] = bars.back().get();
        for (int w = 0; w < threads / 32; ++w) {
          bars.emplace_back(new std::barrier<>(32));
          s->warp_bar[r][w] = bars.back().get();
        }
        s->smem.emplace_back(65536, 0);
      }
      bars.emplace_back(new std::barrier<>(threads * slices));
      s->cluster_bar = bars.back().get();
      std::vector<std::thread> pool;
      for (int r = 0; r < slices; ++r)
        for (int t = 0; t < threads; ++t)
          pool.emplace_back([&, r, t] {
            sim = s.get(); sim_rank = r;
            threadIdx = dim3{(unsigned)t, 0, 0}; blockIdx = dim3{bx, by, (unsigned)r};
            blockDim = dim3{(unsigned)threads, 1, 1}; gridDim = dim3{grid.x, grid.y, (unsigned)slices};
            kernel();
          });
      for (auto& th : pool) th.join();
    }
}
