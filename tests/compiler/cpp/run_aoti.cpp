// Runs an AOTInductor package from C++ with no Python: the deployment a user ships.
//
//   run_aoti MODEL.aoti.pt2 TOKENS.bin BATCH SEQ OUT.bin
//
// TOKENS.bin holds BATCH*SEQ int64 token ids; OUT.bin receives the first output as float32.
// The fused ops come from libultramem_cpu.so, linked in (its static initialisers register
// ultramem::retrieve and ultramem::aggregate with the dispatcher).
// Only ATen and the loader: <torch/torch.h> would triple the compile time.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 6) {
    std::cerr << "usage: run_aoti MODEL.aoti.pt2 TOKENS.bin BATCH SEQ OUT.bin\n";
    return 2;
  }
  const int64_t batch = std::stoll(argv[3]), seq = std::stoll(argv[4]);
  std::vector<int64_t> ids(batch * seq);
  std::ifstream tokens(argv[2], std::ios::binary);
  tokens.read(reinterpret_cast<char*>(ids.data()), ids.size() * sizeof(int64_t));
  if (!tokens) {
    std::cerr << "cannot read " << argv[2] << "\n";
    return 2;
  }
  at::Tensor input = at::from_blob(ids.data(), {batch, seq}, at::kLong).clone();
  c10::InferenceMode inference;
  torch::inductor::AOTIModelPackageLoader loader(argv[1]);
  std::vector<at::Tensor> outputs = loader.run({input});
  at::Tensor first = outputs.at(0).to(at::kFloat).contiguous();
  std::ofstream out(argv[5], std::ios::binary);
  out.write(reinterpret_cast<const char*>(first.data_ptr<float>()), first.numel() * sizeof(float));
  std::cout << "ran " << outputs.size() << " outputs, first " << first.sizes() << "\n";
  return out ? 0 : 1;
}
