// Compiles the pass kernels of the file named by R2UNET_FAST_PASSES twice, as rc_base:: (the
// baseline instruction set) and rc_avx2:: (AVX2 + FMA, under GCC's target pragma; an alias of
// rc_base where R2UNET_FAST_AVX2_PASSES is not defined), for the including file to pick at run
// time with rc_detail::use_avx2_kernels(). Why not target_clones, as csrc/fast_math.h: the hot
// loops are lambdas run by at::parallel_for, which function clones do not reach. Include it
// inside namespace r2unet_fast, after every header the kernels need. No include guard, on purpose.
namespace {  // internal linkage: each file compiles its own copies
namespace rc_base {
using namespace rc_detail;
#include "recurrent_conv_elements.h"
#include R2UNET_FAST_PASSES
}  // namespace rc_base
#ifdef R2UNET_FAST_AVX2_PASSES
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace rc_avx2 {
using namespace rc_detail;
#include "recurrent_conv_elements.h"
#include R2UNET_FAST_PASSES
}  // namespace rc_avx2
#pragma GCC pop_options
#else
namespace rc_avx2 = rc_base;
#endif
}  // namespace
#undef R2UNET_FAST_PASSES
