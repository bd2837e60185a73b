// reformer-host: runs an exported TorchScript causal LM from C++.
//
//   reformer-host MODEL.pt --ids 5,17,42 [--generate N]
//
// MODEL.pt is either
//   - a full-forward file (`reformer-export --format torchscript`): forward(input_ids, attention_mask) returns
//     the logits B, L, V, alone or first in a tuple. Each generated token reruns the whole grown sequence (no
//     cache), which gives the tokens of eager greedy decoding without the cache; or
//   - a decoder file (decoder.pt of `reformer-export --task causal-lm-with-past --format torchscript`):
//     forward(input_ids) is the prefill, returning (logits, cache...), and step(input_ids, cache...) returns
//     (logits, cache...) for one new token. The cache goes from step to step without being looked at.
// The host prints one JSON object on stdout: "last_logits", the logits at the last prompt position, and with
// --generate N, "generated", the N ids greedy decoding appends. It refuses sequences longer than the maximum
// the file's embedded metadata states. Errors: one line on stderr, exit status 2 for bad arguments (and
// sequences too long for the model), 1 for a model that cannot be loaded or run.

#include <torch/script.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {

const char* const kUsage = "usage: reformer-host MODEL.pt --ids 5,17,42 [--generate N]";
// The JSON descriptions the exporters embed, and their key for the longest sequence the graphs serve.
const char* const kForwardMetadata = "reformer_export.json";
const char* const kForwardMaxLengthKey = "max_length";
const char* const kDecoderMetadata = "decoder_config.json";
const char* const kDecoderMaxLengthKey = "max_position_embeddings";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Arguments {
  std::string model_path;
  std::vector<int64_t> ids;
  int64_t generate = -1;  // -1: no --generate
};

int64_t ParseNonNegative(const std::string& text, const std::string& what) {
  if (text.empty() || text.find_first_not_of("0123456789") != std::string::npos || text.size() > 18) {
    throw UsageError(what + " must be a non-negative integer, got '" + text + "'");
  }
  return std::stoll(text);
}

std::vector<int64_t> ParseIds(const std::string& text) {
  std::vector<int64_t> ids;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    ids.push_back(ParseNonNegative(item, "each id in --ids"));
  }
  if (ids.empty() || text.back() == ',') {
    throw UsageError("--ids needs a comma-separated list of token ids, e.g. --ids 5,17,42");
  }
  return ids;
}

Arguments ParseArguments(int argc, char** argv) {
  Arguments arguments;
  bool have_ids = false;
  for (int index = 1; index < argc; ++index) {
    const std::string argument = argv[index];
    const bool has_value = index + 1 < argc;
    if (argument == "--ids" || argument == "--generate") {
      if (!has_value) throw UsageError(argument + " needs a value");
      const std::string value = argv[++index];
      if (argument == "--ids") {
        arguments.ids = ParseIds(value);
        have_ids = true;
      } else {
        arguments.generate = ParseNonNegative(value, "--generate");
      }
    } else if (!argument.empty() && argument[0] == '-') {
      throw UsageError("unknown option " + argument);
    } else if (arguments.model_path.empty()) {
      arguments.model_path = argument;
    } else {
      throw UsageError("unexpected argument " + argument);
    }
  }
  if (arguments.model_path.empty()) throw UsageError("missing MODEL.pt");
  if (!have_ids) throw UsageError("missing --ids");
  return arguments;
}

torch::Tensor IdsTensor(const std::vector<int64_t>& ids) {
  return torch::tensor(ids, torch::kLong).view({1, static_cast<int64_t>(ids.size())});
}

// The logits at the last position of one call's output (logits 1, length, V alone or first in a tuple), and
// the rest of the tuple (a decoder's cache).
std::pair<torch::Tensor, std::vector<torch::IValue>> SplitOutput(const torch::IValue& output, int64_t length) {
  std::vector<torch::IValue> rest;
  if (output.isTuple()) rest = output.toTupleRef().elements().vec();
  else rest.push_back(output);
  if (rest.empty() || !rest.front().isTensor()) throw std::runtime_error("the model returned no logits tensor");
  torch::Tensor logits = rest.front().toTensor();
  if (logits.dim() != 3 || logits.size(0) != 1 || logits.size(1) != length) {
    throw std::runtime_error("the model's first output is not logits of shape [1, " + std::to_string(length) +
                             ", vocab]; is it a causal-lm export?");
  }
  rest.erase(rest.begin());
  return {logits[0][-1], rest};
}

// Runs the model one position at a time after the prompt, with or without a cache.
class Decoder {
 public:
  explicit Decoder(torch::jit::Module module) : module_(std::move(module)), step_(module_.find_method("step")) {}

  bool HasCache() const { return step_.has_value(); }

  // Logits V at the last prompt position.
  torch::Tensor Prompt(const std::vector<int64_t>& ids) {
    sequence_ = ids;
    if (!HasCache()) return Forward();
    auto [logits, cache] = SplitOutput(module_.forward({IdsTensor(ids)}), static_cast<int64_t>(ids.size()));
    cache_ = std::move(cache);
    return logits;
  }

  // Appends `id` and returns the logits V at its position.
  torch::Tensor Next(int64_t id) {
    sequence_.push_back(id);
    if (!HasCache()) return Forward();
    std::vector<torch::IValue> inputs{IdsTensor({id})};
    inputs.insert(inputs.end(), cache_.begin(), cache_.end());
    auto [logits, cache] = SplitOutput((*step_)(std::move(inputs)), 1);
    cache_ = std::move(cache);
    return logits;
  }

 private:
  torch::Tensor Forward() {
    torch::Tensor input_ids = IdsTensor(sequence_);
    return SplitOutput(module_.forward({input_ids, torch::ones_like(input_ids)}), input_ids.size(1)).first;
  }

  torch::jit::Module module_;
  std::optional<torch::jit::Method> step_;
  std::vector<int64_t> sequence_;
  std::vector<torch::IValue> cache_;
};

// Floats as JSON numbers with enough digits to read back the same float32 (non-finite values as null).
std::string JsonFloats(const torch::Tensor& values) {
  torch::Tensor contiguous = values.to(torch::kFloat).contiguous();
  const float* data = contiguous.data_ptr<float>();
  std::string out = "[";
  char buffer[32];
  for (int64_t index = 0; index < contiguous.numel(); ++index) {
    if (index > 0) out += ", ";
    if (std::isfinite(data[index])) {
      std::snprintf(buffer, sizeof(buffer), "%.9g", data[index]);
      out += buffer;
    } else {
      out += "null";
    }
  }
  return out + "]";
}

std::string JsonInts(const std::vector<int64_t>& values) {
  std::string out = "[";
  for (size_t index = 0; index < values.size(); ++index) {
    if (index > 0) out += ", ";
    out += std::to_string(values[index]);
  }
  return out + "]";
}

std::string FirstLine(const std::string& text) { return text.substr(0, text.find('\n')); }

// The integer under `key` at the top level of a JSON object, or 0 when absent. The scan tracks strings and
// nesting, so that a nested key of the same name (a checkpoint config's own "max_length") is not taken.
int64_t TopLevelInteger(const std::string& json, const std::string& key) {
  int depth = 0;
  for (size_t index = 0; index < json.size(); ++index) {
    const char character = json[index];
    if (character == '"') {
      size_t end = index + 1;
      while (end < json.size() && json[end] != '"') end += json[end] == '\\' ? 2 : 1;
      if (end >= json.size()) return 0;
      const size_t after = json.find_first_not_of(" \t\r\n", end + 1);
      if (depth == 1 && after != std::string::npos && json[after] == ':' &&
          json.compare(index + 1, end - index - 1, key) == 0) {
        return std::strtoll(json.c_str() + after + 1, nullptr, 10);
      }
      index = end;
    } else if (character == '{' || character == '[') {
      ++depth;
    } else if (character == '}' || character == ']') {
      --depth;
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Arguments arguments;
  try {
    arguments = ParseArguments(argc, argv);
  } catch (const std::exception& error) {
    std::cerr << "reformer-host: " << error.what() << " (" << kUsage << ")" << std::endl;
    return 2;
  }
  torch::jit::Module module;
  torch::jit::ExtraFilesMap extra_files{{kForwardMetadata, ""}, {kDecoderMetadata, ""}};
  try {
    module = torch::jit::load(arguments.model_path, torch::kCPU, extra_files);
  } catch (const std::exception& error) {
    std::cerr << "reformer-host: cannot load " << arguments.model_path << " as TorchScript: "
              << FirstLine(error.what()) << std::endl;
    return 1;
  }
  // The last generated id is predicted from position P + N - 2 (0-based), so P + N - 1 positions are needed.
  const int64_t generate = std::max<int64_t>(arguments.generate, 0);
  const int64_t needed = static_cast<int64_t>(arguments.ids.size()) + std::max<int64_t>(generate - 1, 0);
  const int64_t max_length = std::max(TopLevelInteger(extra_files[kForwardMetadata], kForwardMaxLengthKey),
                                      TopLevelInteger(extra_files[kDecoderMetadata], kDecoderMaxLengthKey));
  if (max_length > 0 && needed > max_length) {
    std::cerr << "reformer-host: " << arguments.ids.size() << " ids plus " << generate << " generated need "
              << needed << " positions; the model takes at most " << max_length << std::endl;
    return 2;
  }
  try {
    module.eval();
    torch::NoGradGuard no_grad;
    Decoder decoder(std::move(module));
    const torch::Tensor last_logits = decoder.Prompt(arguments.ids);
    std::vector<int64_t> generated;
    torch::Tensor next_logits = last_logits;
    for (int64_t step = 0; step < generate; ++step) {
      // argmax picks the first of tied maxima, as torch.argmax does in eager decoding.
      generated.push_back(next_logits.argmax().item<int64_t>());
      if (step + 1 < generate) next_logits = decoder.Next(generated.back());
    }
    std::string json = "{\"last_logits\": " + JsonFloats(last_logits);
    if (arguments.generate >= 0) json += ", \"generated\": " + JsonInts(generated);
    std::cout << json << "}" << std::endl;
  } catch (const std::exception& error) {
    std::cerr << "reformer-host: running " << arguments.model_path << " failed: " << FirstLine(error.what())
              << std::endl;
    return 1;
  }
  return 0;
}
