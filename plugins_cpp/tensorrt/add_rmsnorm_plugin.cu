// TensorRT IPluginV3 `trtllm::add_rmsnorm` (version "2"; version "1" is the tensorrt.plugin one
// around the Triton kernel) running the kernel of ../csrc/add_rmsnorm_kernel.cuh.
//
// Inputs x, residual [..., H] and w [H] (fp32 / fp16 / bf16, one type, linear); one field,
// `eps` (float32); outputs (y, x + residual) shaped and typed as x. The library exports
// `getCreators`, so `tensorrt.get_plugin_registry().load_library(path)` (or trtexec's
// `--dynamicPlugins`) registers it. Written against TensorRT 10's NvInfer.h; compiled only where
// those headers are found (plugins_cpp/tensorrt_plugins.py), which none of this project's test
// machines has.
#include <NvInfer.h>
#include <NvInferRuntimePlugin.h>

#include <cstring>
#include <string>
#include <vector>

#include "../csrc/add_rmsnorm_kernel.cuh"

namespace trtllm_cpp {
namespace {

using namespace nvinfer1;

constexpr char const* kName = "add_rmsnorm";
constexpr char const* kVersion = "2";
constexpr char const* kNamespace = "trtllm";

bool to_norm_dtype(DataType type, NormDtype& out) {
  switch (type) {
    case DataType::kFLOAT: out = NormDtype::kFloat32; return true;
    case DataType::kHALF: out = NormDtype::kFloat16; return true;
    case DataType::kBF16: out = NormDtype::kBFloat16; return true;
    default: return false;
  }
}

class AddRmsNormPlugin : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime {
 public:
  explicit AddRmsNormPlugin(float eps) : eps_(eps) { init_fields(); }
  AddRmsNormPlugin(AddRmsNormPlugin const& other) : eps_(other.eps_) { init_fields(); }

  IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
    switch (type) {
      case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
      case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
      case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    }
    return nullptr;
  }
  IPluginV3* clone() noexcept override { return new AddRmsNormPlugin(*this); }

  char const* getPluginName() const noexcept override { return kName; }
  char const* getPluginVersion() const noexcept override { return kVersion; }
  char const* getPluginNamespace() const noexcept override { return kNamespace; }

  int32_t getNbOutputs() const noexcept override { return 2; }
  int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t, DynamicPluginTensorDesc const*,
                          int32_t) noexcept override {
    return 0;
  }
  // Every input and output linear and of x's type (fp32 / fp16 / bf16).
  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override {
    NormDtype unused;
    PluginTensorDesc const& desc = inOut[pos].desc;
    return desc.format == TensorFormat::kLINEAR && to_norm_dtype(desc.type, unused) &&
           desc.type == inOut[0].desc.type;
  }
  int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                             int32_t nbInputs) const noexcept override {
    outputTypes[0] = outputTypes[1] = inputTypes[0];
    return 0;
  }
  int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
                          int32_t nbOutputs, IExprBuilder&) noexcept override {
    if (nbInputs != 3 || nbOutputs != 2) return -1;
    outputs[0] = inputs[0];  // y: as x
    outputs[1] = inputs[0];  // x + residual
    return 0;
  }
  size_t getWorkspaceSize(DynamicPluginTensorDesc const*, int32_t, DynamicPluginTensorDesc const*,
                          int32_t) const noexcept override {
    return 0;
  }

  int32_t onShapeChange(PluginTensorDesc const*, int32_t, PluginTensorDesc const*, int32_t) noexcept override {
    return 0;
  }
  IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }
  PluginFieldCollection const* getFieldsToSerialize() noexcept override { return &field_collection_; }

  int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
                  void* const* outputs, void*, cudaStream_t stream) noexcept override {
    NormDtype dtype;
    if (!to_norm_dtype(inputDesc[0].type, dtype)) return -1;
    Dims const& dims = inputDesc[0].dims;
    int64_t const hidden = dims.d[dims.nbDims - 1];
    int64_t rows = 1;
    for (int32_t i = 0; i + 1 < dims.nbDims; ++i) rows *= dims.d[i];
    cudaError_t status = launch_add_rmsnorm(dtype, inputs[0], inputs[1], inputs[2], outputs[0], outputs[1], rows,
                                            static_cast<int>(hidden), eps_, stream);
    return status == cudaSuccess ? 0 : -1;
  }

 private:
  void init_fields() {
    fields_ = {PluginField("eps", &eps_, PluginFieldType::kFLOAT32, 1)};
    field_collection_.nbFields = static_cast<int32_t>(fields_.size());
    field_collection_.fields = fields_.data();
  }

  float eps_;
  std::vector<PluginField> fields_;
  PluginFieldCollection field_collection_{};
};

class AddRmsNormCreator : public IPluginCreatorV3One {
 public:
  AddRmsNormCreator() {
    fields_ = {PluginField("eps", nullptr, PluginFieldType::kFLOAT32, 1)};
    field_collection_.nbFields = static_cast<int32_t>(fields_.size());
    field_collection_.fields = fields_.data();
  }
  char const* getPluginName() const noexcept override { return kName; }
  char const* getPluginVersion() const noexcept override { return kVersion; }
  char const* getPluginNamespace() const noexcept override { return kNamespace; }
  PluginFieldCollection const* getFieldNames() noexcept override { return &field_collection_; }

  // `eps` arrives as a float32 field (from the ONNX attribute, or a serialized engine).
  IPluginV3* createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override {
    float eps = 1e-6f;
    for (int32_t i = 0; i < fc->nbFields; ++i) {
      PluginField const& field = fc->fields[i];
      if (std::strcmp(field.name, "eps") == 0 && field.type == PluginFieldType::kFLOAT32 && field.data != nullptr) {
        eps = *static_cast<float const*>(field.data);
      }
    }
    return new AddRmsNormPlugin(eps);
  }

 private:
  std::vector<PluginField> fields_;
  PluginFieldCollection field_collection_{};
};

}  // namespace
}  // namespace trtllm_cpp

// The plugin library's entry point: TensorRT calls it when the library is loaded.
extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static trtllm_cpp::AddRmsNormCreator creator;
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
  nbCreators = 1;
  return creators;
}
