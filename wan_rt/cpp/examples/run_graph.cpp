// Run one wan_rt AOTInductor engine graph from C++: named inputs from a .safetensors file, named
// outputs to another. The smallest use of the library's graph loader.
//
//   run_graph engines/dit_high_noise/main inputs.safetensors outputs.safetensors [cpu|cuda]
//
// Built with the library: `python -m wan_rt.cpp build` (the executable sits beside wan-rt-cpp).

#include "wan_rt/aoti_graph.h"
#include "wan_rt/safetensors.h"

#include <iostream>

int main(int argc, char** argv) {
  if (argc < 4 || argc > 5) {
    std::cerr << "usage: run_graph GRAPH_DIR INPUTS.safetensors OUTPUTS.safetensors [cpu|cuda]\n";
    return 2;
  }
  try {
    const c10::Device device(argc == 5 ? argv[4] : "cpu");
    wan_rt::AotiGraph graph(argv[1], device);
    auto loaded = wan_rt::read_safetensors(argv[2], device);
    auto outputs = graph.run(std::map<std::string, at::Tensor>(loaded.begin(), loaded.end()));
    wan_rt::write_safetensors(argv[3], outputs);
    for (const auto& [name, t] : outputs) std::cout << name << " " << t.sizes() << "\n";
  } catch (const std::exception& e) {
    std::string what = e.what();
    std::cerr << "run_graph: error: " << what.substr(0, what.find('\n')) << "\n";
    return 2;
  }
  return 0;
}
