// Token embedding gather: rows of a bf16 table to f32.
#include "arbor.cuh"

// out[r][:] = table[tokens[r]][:] as f32, for r < rows. One block per row; a token id at or
// beyond `vocab` yields a row of zeros (the wrapper cannot see device token ids; callers
// check them on the host, as the CPU reference does).
extern "C" __global__ void embedding(const bf16_t* __restrict__ table,
                                     const u32* __restrict__ tokens, int rows, int hidden,
                                     int vocab, float* __restrict__ out) {
    int r = blockIdx.x;
    if (r >= rows) return;
    u32 t = tokens[r];
    float* o = out + (u64)r * hidden;
    if (t >= (u32)vocab) {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = 0.0f;
        return;
    }
    const bf16_t* src = table + (u64)t * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = bf16_to_f32(src[i]);
}
