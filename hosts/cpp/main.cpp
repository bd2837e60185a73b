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
// --generate N, "generated", the N ids greedy decoding appends. It refuses ids outside the vocabulary and
// sequences longer than the maximum that the file's embedded metadata states. Errors: one line on stderr, exit
// status 2 for bad arguments (and ids or sequences the model does not take), 1 for a model that cannot be
// loaded, checked (no vocabulary size in its metadata) or run. --help prints kHelp below.

#include <torch/script.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {

const char* const kUsage = "usage: reformer-host MODEL.pt --ids 5,17,42 [--generate N]";
const char* const kHelp = R"(usage: reformer-host MODEL.pt --ids 5,17,42 [--generate N]

Runs a causal LM exported as TorchScript by reformer-export, without Python.

MODEL.pt is either
  - the file of `reformer-export --format torchscript` (the full forward: each generated token reruns the
    whole grown sequence), or
  - decoder.pt of `reformer-export --task causal-lm-with-past --format torchscript` (a prefill, then one
    step per generated token with the cache).

Options:
  --ids I,J,...   the prompt: comma-separated token ids, each from 0 to vocab_size - 1 (the vocabulary size
                  that the file's embedded metadata states)
  --generate N    also append N ids by greedy decoding; the prompt plus N - 1 positions must fit the
                  file's maximum length
  -h, --help      print this text and exit

Output: one JSON object on stdout: "last_logits", the logits at the last prompt position, and with
--generate N, "generated", the N ids that greedy decoding appends.

Exit status: 0 on success; 2 for bad arguments (an unknown option, a malformed id, an id outside the
vocabulary, a sequence longer than the model takes); 1 for a model that cannot be loaded or run (a file
whose metadata states no vocabulary size included). Errors are one line on stderr, with nothing on stdout.
)";
// The JSON descriptions the exporters embed, and the key paths in them of the longest sequence the graphs
// serve and of the vocabulary size.
const char* const kForwardMetadata = "reformer_export.json";
const std::vector<std::string> kForwardMaxLengthPath{"max_length"};
const std::vector<std::string> kForwardVocabSizePath{"config", "vocab_size"};
const char* const kDecoderMetadata = "decoder_config.json";
const std::vector<std::string> kDecoderMaxLengthPath{"max_length"};
const std::vector<std::string> kDecoderVocabSizePath{"vocab_size"};

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Arguments {
  bool help = false;  // --help or -h: print kHelp and nothing else
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

// An integer with an optional leading '-'. Negative ids parse, so that the check against the vocabulary (once
// the model's metadata is read) names them with the valid range.
int64_t ParseInteger(const std::string& text, const std::string& what) {
  const bool negative = !text.empty() && text[0] == '-';
  const std::string digits = text.substr(negative ? 1 : 0);
  if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos || digits.size() > 18) {
    throw UsageError(what + " must be an integer, got '" + text + "'");
  }
  const int64_t value = std::stoll(digits);
  return negative ? -value : value;
}

std::vector<int64_t> ParseIds(const std::string& text) {
  std::vector<int64_t> ids;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    ids.push_back(ParseInteger(item, "each id in --ids"));
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
    if (argument == "--help" || argument == "-h") {
      arguments.help = true;
      return arguments;
    }
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

// The integer at `path` in a JSON object: path {"config", "vocab_size"} is the key "vocab_size" of the object
// under the top-level key "config". Absent (also for a value that is not an integer, or text that is not an
// object) gives nullopt. The scan tracks strings and nesting, so that a nested key of the same name (a
// checkpoint config's own "max_length") is not taken for a top-level one.
std::optional<int64_t> JsonInteger(const std::string& json, const std::vector<std::string>& path) {
  int depth = 0;
  size_t matched = 0;  // keys of `path` matched so far; the scan is inside their object
  for (size_t index = 0; index < json.size(); ++index) {
    const char character = json[index];
    if (character == '"') {
      size_t end = index + 1;
      while (end < json.size() && json[end] != '"') end += json[end] == '\\' ? 2 : 1;
      if (end >= json.size()) return std::nullopt;
      const size_t colon = json.find_first_not_of(" \t\r\n", end + 1);
      if (depth == static_cast<int>(matched) + 1 && colon != std::string::npos && json[colon] == ':' &&
          json.compare(index + 1, end - index - 1, path[matched]) == 0) {
        const size_t value = json.find_first_not_of(" \t\r\n", colon + 1);
        if (value == std::string::npos) return std::nullopt;
        if (++matched < path.size()) {
          if (json[value] != '{') return std::nullopt;
          index = value - 1;  // the next iteration enters the object
          continue;
        }
        const char* const start = json.c_str() + value;
        char* end_of_number = nullptr;
        const int64_t result = std::strtoll(start, &end_of_number, 10);
        const bool integer =
            end_of_number != start && *end_of_number != '\0' && std::strchr(",}] \t\r\n", *end_of_number);
        return integer ? std::optional<int64_t>(result) : std::nullopt;
      }
      index = end;
    } else if (character == '{' || character == '[') {
      ++depth;
    } else if (character == '}' || character == ']') {
      // Leaving the object of the keys matched so far: the next key of `path` is not in it.
      if (--depth < static_cast<int>(matched) + 1) return std::nullopt;
    }
  }
  return std::nullopt;
}

// The vocabulary size that the file's metadata states (a forward file's or a decoder file's), or nullopt.
std::optional<int64_t> VocabSize(torch::jit::ExtraFilesMap& extra_files) {
  std::optional<int64_t> size = JsonInteger(extra_files[kForwardMetadata], kForwardVocabSizePath);
  if (!size) size = JsonInteger(extra_files[kDecoderMetadata], kDecoderVocabSizePath);
  if (size && *size <= 0) return std::nullopt;
  return size;
}

// An error message for the first id outside [0, vocab_size), or nullopt when all are inside.
std::optional<std::string> IdOutsideVocabulary(const std::vector<int64_t>& ids, int64_t vocab_size) {
  for (size_t position = 0; position < ids.size(); ++position) {
    if (ids[position] < 0 || ids[position] >= vocab_size) {
      return "id " + std::to_string(ids[position]) + " at position " + std::to_string(position) +
             " of --ids (counting from 0) is outside the vocabulary: ids must be from 0 to " +
             std::to_string(vocab_size - 1) + " (vocab_size " + std::to_string(vocab_size) + ")";
    }
  }
  return std::nullopt;
}

}  // namespace

int main(int argc, char** argv) {
  Arguments arguments;
  try {
    arguments = ParseArguments(argc, argv);
  } catch (const std::exception& error) {
    std::cerr << "reformer-host: " << error.what() << " (" << kUsage << "; --help for more)" << std::endl;
    return 2;
  }
  if (arguments.help) {
    std::cout << kHelp;
    return 0;
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
  const std::optional<int64_t> vocab_size = VocabSize(extra_files);
  if (!vocab_size) {
    std::cerr << "reformer-host: " << arguments.model_path << " states no vocabulary size in its metadata ("
              << kForwardMetadata << " config.vocab_size or " << kDecoderMetadata << " vocab_size), so its ids "
              << "cannot be checked; is it a reformer-export TorchScript file?" << std::endl;
    return 1;
  }
  if (const std::optional<std::string> message = IdOutsideVocabulary(arguments.ids, *vocab_size)) {
    std::cerr << "reformer-host: " << *message << std::endl;
    return 2;
  }
  // The last generated id is predicted from position P + N - 2 (0-based), so P + N - 1 positions are needed.
  const int64_t generate = std::max<int64_t>(arguments.generate, 0);
  const int64_t needed = static_cast<int64_t>(arguments.ids.size()) + std::max<int64_t>(generate - 1, 0);
  const int64_t max_length =
      std::max(JsonInteger(extra_files[kForwardMetadata], kForwardMaxLengthPath).value_or(0),
               JsonInteger(extra_files[kDecoderMetadata], kDecoderMaxLengthPath).value_or(0));
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
