// The host code of every op family in one translation unit: the ATen headers, the slow part of the
// build, are parsed once (a build of the eight sources one by one costs several times as much on a
// small CI machine). The op families stay one source each.
#include "add_noise.cpp"
#include "affine.cpp"
#include "bias.cpp"
#include "conv.cpp"
#include "embedding.cpp"
#include "linear_clipped_sum.cpp"
#include "linear_norms.cpp"
#include "secure_noise.cpp"
