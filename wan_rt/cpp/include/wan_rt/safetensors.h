// .safetensors files (https://github.com/huggingface/safetensors): an 8-byte little-endian header
// length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, raw bytes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <map>
#include <string>
#include <unordered_map>

namespace wan_rt {

// Every tensor of `path`, on `device`.
std::unordered_map<std::string, at::Tensor> read_safetensors(const std::string& path,
                                                             const c10::Device& device = c10::Device("cpu"));

// The tensors a wan_rt weights.json points at: {"files": [{"path", "size"}], "tensors": {name:
// {"file", "offset", "dtype", "shape"}}}, bytes read from checkpoint files (paths relative to it,
// or absolute) at those offsets; on `device`.
std::unordered_map<std::string, at::Tensor> read_weight_refs(const std::string& path,
                                                             const c10::Device& device = c10::Device("cpu"));

// `tensors` (moved to the CPU, made contiguous) into `path`; the file appears only when complete.
void write_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors);

}  // namespace wan_rt
