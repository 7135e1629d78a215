// Compiled by nvcc into every CUDA build of fastvq; fastvq.cpp links against these, so a build that
// reports CUDA necessarily compiled its .cu sources. Deliberately torch-free (fast to compile).
#include <string>
#include <vector>

namespace fastvq {

std::string cuda_compiler_version() {
#if !defined(__CUDACC__)
  return "emulated";  // the CPU emulation build compiles this file with g++
#else
  return std::to_string(__CUDACC_VER_MAJOR__) + "." + std::to_string(__CUDACC_VER_MINOR__) + "." +
         std::to_string(__CUDACC_VER_BUILD__);
#endif
}

// nvcc lists the virtual architectures of this compilation in __CUDA_ARCH_LIST__ (e.g. 800,900).
std::vector<std::string> cuda_archs_compiled() {
  std::vector<std::string> out;
#if defined(__CUDA_ARCH_LIST__)
  for (int a : {__CUDA_ARCH_LIST__}) out.push_back("sm_" + std::to_string(a / 10));
#endif
  return out;
}

}  // namespace fastvq
