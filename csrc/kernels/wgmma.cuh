// wgmma.cuh: the sm_90a pieces of the warpgroup layout: the 128-byte swizzled shared-memory tiles
// that wgmma reads, their matrix descriptors, and the fences around the asynchronous MMAs.
//
// A tile of kRows rows x D columns (16-bit elements, D a multiple of 64) is stored as D / 64
// column blocks of (kRows, 64), each row 128 bytes. Inside a block, the 16-byte chunk c of row r
// sits at chunk c ^ (r % 8) (the hardware's 128-byte swizzle): the 8 rows of an 8 x 128-byte
// atom hit 8 different bank groups, for cp.async writes and wgmma reads alike. Every tile starts
// 1024-byte aligned (one atom), which the swizzle requires.
//
// Descriptors (PTX ISA, "matrix descriptor"): bits 0-13 start address >> 4, 16-29 leading byte
// offset >> 4, 32-45 stride byte offset >> 4, 62-63 swizzle mode (1 = 128 bytes).
//   K-major operand (Q and K for S = Q K^T: 16 contiguous K elements per row): the 8-row atoms
//     are 1024 bytes apart (stride offset); the leading offset is unused. The 16-column step kk
//     of a block starts 32 kk bytes into it.
//   MN-major operand (V for O += P V: rows are keys = the K dimension, columns the head dim N):
//     8-key groups 1024 bytes apart (stride offset), 64-column blocks kRows * 128 bytes apart
//     (leading offset). The 16-key step kk starts 16 * 128 kk bytes in.
#pragma once

#include <stdint.h>

#include "wgmma_ops.cuh"

namespace fdm {

constexpr int kSwizzleCols = 64;       // 16-bit elements per swizzled row
constexpr int kSwizzleRowBytes = 128;  // bytes per swizzled row
constexpr int kSwizzleAlign = 1024;    // bytes of one 8-row swizzle atom

// Element offset of (row, col) in a swizzled (kRows, D) tile.
template <int kRows>
__device__ __forceinline__ int swizzled_offset(int row, int col) {
    const int block = col / kSwizzleCols, chunk = (col % kSwizzleCols) / 8;
    return block * (kRows * kSwizzleCols) + row * kSwizzleCols + ((chunk ^ (row % 8)) * 8) + col % 8;
}

// A descriptor is (kDescriptorHigh << 32) | low word; the low word holds the start address >> 4
// (14 bits: shared addresses are below 2^18) and the leading byte offset >> 4. A step of the
// start address inside a tile is a constant added to the low word of the tile's, so a tile's
// descriptors cost one add each (the start field cannot overflow: every address stays inside
// shared memory), not the mask, shift and or of a descriptor built from scratch per MMA.
constexpr uint32_t kDescriptorHigh = (kSwizzleAlign >> 4) | (1u << 30);  // stride offset, 128-byte swizzle
__device__ __forceinline__ uint32_t descriptor_low(uint32_t addr, uint32_t leading_bytes) {
    return ((addr & 0x3ffff) >> 4) | ((leading_bytes >> 4) << 16);
}
__device__ __forceinline__ uint64_t descriptor(uint32_t low) {
    return (static_cast<uint64_t>(kDescriptorHigh) << 32) | low;
}
// Step kk (16 columns) of a K-major (kRows, D) tile at shared address `tile`.
template <int kRows>
__device__ __forceinline__ uint64_t kmajor_descriptor(uint32_t tile, int kk) {
    return descriptor(descriptor_low(tile, 16) + ((kk / 4) * (kRows * kSwizzleRowBytes) + (kk % 4) * 32) / 16);
}
// Step kk (16 rows = keys) of an MN-major (kRows, D) tile at shared address `tile`.
template <int kRows>
__device__ __forceinline__ uint64_t mnmajor_descriptor(uint32_t tile, int kk) {
    return descriptor(descriptor_low(tile, kRows * kSwizzleRowBytes) + kk * 16 * kSwizzleRowBytes / 16);
}

// x, which must be the same in every lane of the warp, broadcast from lane 0: the compiler cannot
// tell that a value computed from threadIdx is warp-uniform, and a shuffle's result it knows is,
// so what is derived from it can live in uniform registers (which wgmma's descriptors are read from).
__device__ __forceinline__ uint32_t uniform_u32(uint32_t x) { return __shfl_sync(0xffffffffu, x, 0); }

// Orders this warpgroup's register accesses before the wgmmas that follow (wgmma.fence).
__device__ __forceinline__ void wgmma_fence() {
#ifdef FDM_WGMMA
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef FDM_WGMMA
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Waits until at most kPending committed groups of this warpgroup are in flight.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#ifdef FDM_WGMMA
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}
// Keeps the compiler from moving reads or writes of d across the asynchronous MMA's issue or wait.
template <int N>
__device__ __forceinline__ void fence_registers(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// Named barrier `id` (1..15; 0 is __syncthreads') over `threads` threads of the CTA: sync waits
// until that many have arrived or synced, arrive counts this warp without waiting.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Makes this thread's generic-proxy writes to shared memory (cp.async included) visible to the
// async proxy that wgmma reads through; a CTA barrier after it publishes them to every thread.
__device__ __forceinline__ void fence_proxy_async() {
#ifdef FDM_WGMMA
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

}  // namespace fdm
