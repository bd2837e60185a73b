// reformer-host: runs an exported causal LM from C++: a TorchScript file or an AOTInductor package.
//
//   reformer-host MODEL.pt --ids 5,17,42 [--generate N]
//   reformer-host MODEL.pt2 --ids 5,17,42 [--generate N]
//
// The format comes from the file name: `.pt2` is an AOTInductor package (`reformer-export --format aoti`, run by
// torch::inductor::AOTIModelPackageLoader), anything else TorchScript (`--format torchscript`, torch::jit::load).
// Either holds
//   - the full forward: (input_ids, attention_mask) -> the logits B, L, V, alone or first among the outputs.
//     TorchScript: the module's forward; AOTInductor: the package's model "model". Each generated token reruns
//     the whole grown sequence (no cache), which gives the tokens of eager greedy decoding without the cache; or
//   - the decoder (decoder.pt or decoder.pt2 of `reformer-export --task causal-lm-with-past`): a prefill,
//     (input_ids) -> (logits, cache...), and a step, (input_ids, cache...) -> (logits, cache...) for one new
//     token. TorchScript: the module's forward and step methods; AOTInductor: the package's models "prefill"
//     and "step". The cache goes from step to step without being looked at.
// Both formats embed the exporter's JSON description (TorchScript as an extra file, AOTInductor as a metadata
// entry, under the same name): reformer_export.json for the full forward, decoder_config.json for the decoder.
// The host prints one JSON object on stdout: "last_logits", the logits at the last prompt position, and with
// --generate N, "generated", the N ids greedy decoding appends. It refuses ids outside the vocabulary and
// sequences longer than the maximum that the file's embedded description states. Errors: one line on stderr,
// exit status 2 for bad arguments (and ids or sequences the model does not take), 1 for a model that cannot be
// loaded, checked (no vocabulary size in its description) or run. --help prints kHelp below.

#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {

const char* const kUsage = "usage: reformer-host MODEL --ids 5,17,42 [--generate N]";
const char* const kHelp = R"(usage: reformer-host MODEL --ids 5,17,42 [--generate N]

Runs a causal LM exported by reformer-export, without Python.

MODEL is a TorchScript file (.pt) or an AOTInductor package (.pt2), either
  - the file of `reformer-export --format torchscript` or `--format aoti` (the full forward: each generated
    token reruns the whole grown sequence), or
  - decoder.pt or decoder.pt2 of `reformer-export --task causal-lm-with-past` (a prefill, then one step per
    generated token with the cache).
A file whose name ends in .pt2 is read as an AOTInductor package, any other as TorchScript.

Options:
  --ids I,J,...   the prompt: comma-separated token ids, each from 0 to vocab_size - 1 (the vocabulary size
                  that the file's embedded description states)
  --generate N    also append N ids by greedy decoding; the prompt plus N - 1 positions must fit the
                  file's maximum length
  -h, --help      print this text and exit

Output: one JSON object on stdout: "last_logits", the logits at the last prompt position, and with
--generate N, "generated", the N ids that greedy decoding appends.

Exit status: 0 on success; 2 for bad arguments (an unknown option, a malformed id, an id outside the
vocabulary, a sequence longer than the model takes); 1 for a model that cannot be loaded or run (a file
whose description states no vocabulary size included). Errors are one line on stderr, with nothing on stdout.
)";
// The JSON descriptions the exporters embed, and the key paths in them of the longest sequence the graphs
// serve and of the vocabulary size.
const char* const kForwardMetadata = "reformer_export.json";
const std::vector<std::string> kForwardMaxLengthPath{"max_length"};
const std::vector<std::string> kForwardVocabSizePath{"config", "vocab_size"};
const char* const kDecoderMetadata = "decoder_config.json";
const std::vector<std::string> kDecoderMaxLengthPath{"max_length"};
const std::vector<std::string> kDecoderVocabSizePath{"vocab_size"};
// The models of an AOTInductor package: the full forward, or a decoder's prefill and step.
const char* const kAotiForwardModel = "model";
const char* const kAotiPrefillModel = "prefill";
const char* const kAotiStepModel = "step";

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
  if (arguments.model_path.empty()) throw UsageError("missing MODEL");
  if (!have_ids) throw UsageError("missing --ids");
  return arguments;
}

using Tensors = std::vector<torch::Tensor>;
using Graph = std::function<Tensors(Tensors)>;

// An exported model, whatever its file format: the JSON descriptions it embeds and its graphs. `forward` is the
// full forward, (input_ids, attention_mask) -> (logits, ...), or a decoder's prefill, (input_ids) -> (logits,
// cache...); `step`, set for a decoder only, is (input_ids, cache...) -> (logits, cache...).
struct Graphs {
  std::map<std::string, std::string> descriptions;  // kForwardMetadata or kDecoderMetadata -> its JSON text
  Graph forward;
  Graph step;

  std::string Description(const std::string& name) const {
    const auto found = descriptions.find(name);
    return found == descriptions.end() ? "" : found->second;
  }
};

// The outputs of a TorchScript call, a tensor or a tuple of tensors, as tensors.
Tensors AsTensors(const torch::IValue& output) {
  if (!output.isTuple()) return {output.toTensor()};
  Tensors tensors;
  for (const torch::IValue& element : output.toTupleRef().elements()) tensors.push_back(element.toTensor());
  return tensors;
}

Graphs LoadTorchScript(const std::string& path) {
  torch::jit::ExtraFilesMap extra_files{{kForwardMetadata, ""}, {kDecoderMetadata, ""}};
  torch::jit::Module module = torch::jit::load(path, torch::kCPU, extra_files);
  module.eval();
  const auto method = [module](const std::string& name) -> Graph {
    return [module, name](Tensors inputs) {
      return AsTensors(module.get_method(name)(std::vector<torch::IValue>(inputs.begin(), inputs.end())));
    };
  };
  Graphs graphs{{extra_files.begin(), extra_files.end()}, method("forward"), nullptr};
  if (module.find_method("step")) graphs.step = method("step");
  return graphs;
}

// The names of the models an AOTInductor package holds (its records data/aotinductor/NAME/...).
std::set<std::string> PackageModelNames(const std::string& path) {
  const std::string folder = "data/aotinductor/";
  std::set<std::string> names;
  for (const std::string& record : caffe2::serialize::PyTorchStreamReader(path).getAllRecords()) {
    if (record.compare(0, folder.size(), folder) != 0) continue;
    names.insert(record.substr(folder.size(), record.find('/', folder.size()) - folder.size()));
  }
  return names;
}

Graphs LoadAotiPackage(const std::string& path) {
  const bool decoder = PackageModelNames(path).count(kAotiStepModel) > 0;
  const auto load = [&path](const std::string& model_name) {
    return std::make_shared<torch::inductor::AOTIModelPackageLoader>(path, model_name);
  };
  const auto run = [](std::shared_ptr<torch::inductor::AOTIModelPackageLoader> loader) -> Graph {
    return [loader](Tensors inputs) { return loader->run(inputs); };
  };
  const auto forward = load(decoder ? kAotiPrefillModel : kAotiForwardModel);
  Graphs graphs{{}, run(forward), decoder ? run(load(kAotiStepModel)) : nullptr};
  for (const auto& [key, value] : forward->get_metadata()) {
    if (key == kForwardMetadata || key == kDecoderMetadata) graphs.descriptions[key] = value;
  }
  return graphs;
}

// The format comes from the file name: torch writes AOTInductor packages only to names that end in .pt2.
bool IsAotiPackage(const std::string& path) {
  const std::string extension = ".pt2";
  return path.size() >= extension.size() &&
         path.compare(path.size() - extension.size(), extension.size(), extension) == 0;
}

Graphs LoadGraphs(const std::string& path) {
  return IsAotiPackage(path) ? LoadAotiPackage(path) : LoadTorchScript(path);
}

torch::Tensor IdsTensor(const std::vector<int64_t>& ids) {
  return torch::tensor(ids, torch::kLong).view({1, static_cast<int64_t>(ids.size())});
}

// The logits at the last position of one call's outputs (logits 1, length, V first), and the other outputs
// (a decoder's cache).
std::pair<torch::Tensor, Tensors> SplitOutput(Tensors outputs, int64_t length) {
  if (outputs.empty()) throw std::runtime_error("the model returned no outputs");
  const torch::Tensor logits = outputs.front();
  if (logits.dim() != 3 || logits.size(0) != 1 || logits.size(1) != length) {
    throw std::runtime_error("the model's first output is not logits of shape [1, " + std::to_string(length) +
                             ", vocab]; is it a causal-lm export?");
  }
  outputs.erase(outputs.begin());
  return {logits[0][-1], std::move(outputs)};
}

// Runs the model one position at a time after the prompt, with or without a cache.
class Decoder {
 public:
  explicit Decoder(Graphs graphs) : graphs_(std::move(graphs)) {}

  bool HasCache() const { return static_cast<bool>(graphs_.step); }

  // Logits V at the last prompt position.
  torch::Tensor Prompt(const std::vector<int64_t>& ids) {
    sequence_ = ids;
    if (!HasCache()) return Forward();
    auto [logits, cache] = SplitOutput(graphs_.forward({IdsTensor(ids)}), static_cast<int64_t>(ids.size()));
    cache_ = std::move(cache);
    return logits;
  }

  // Appends `id` and returns the logits V at its position.
  torch::Tensor Next(int64_t id) {
    sequence_.push_back(id);
    if (!HasCache()) return Forward();
    Tensors inputs{IdsTensor({id})};
    inputs.insert(inputs.end(), cache_.begin(), cache_.end());
    auto [logits, cache] = SplitOutput(graphs_.step(std::move(inputs)), 1);
    cache_ = std::move(cache);
    return logits;
  }

 private:
  torch::Tensor Forward() {
    const torch::Tensor input_ids = IdsTensor(sequence_);
    return SplitOutput(graphs_.forward({input_ids, torch::ones_like(input_ids)}), input_ids.size(1)).first;
  }

  Graphs graphs_;
  std::vector<int64_t> sequence_;
  Tensors cache_;
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

// The vocabulary size that the file's description states (a forward file's or a decoder file's), or nullopt.
std::optional<int64_t> VocabSize(const Graphs& graphs) {
  std::optional<int64_t> size = JsonInteger(graphs.Description(kForwardMetadata), kForwardVocabSizePath);
  if (!size) size = JsonInteger(graphs.Description(kDecoderMetadata), kDecoderVocabSizePath);
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
  Graphs graphs;
  try {
    graphs = LoadGraphs(arguments.model_path);
  } catch (const std::exception& error) {
    std::cerr << "reformer-host: cannot load " << arguments.model_path << " as "
              << (IsAotiPackage(arguments.model_path) ? "an AOTInductor package" : "TorchScript") << ": "
              << FirstLine(error.what()) << std::endl;
    return 1;
  }
  const std::optional<int64_t> vocab_size = VocabSize(graphs);
  if (!vocab_size) {
    std::cerr << "reformer-host: " << arguments.model_path << " states no vocabulary size in its description ("
              << kForwardMetadata << " config.vocab_size or " << kDecoderMetadata << " vocab_size), so its ids "
              << "cannot be checked; is it a file of reformer-export?" << std::endl;
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
      std::max(JsonInteger(graphs.Description(kForwardMetadata), kForwardMaxLengthPath).value_or(0),
               JsonInteger(graphs.Description(kDecoderMetadata), kDecoderMaxLengthPath).value_or(0));
  if (max_length > 0 && needed > max_length) {
    std::cerr << "reformer-host: " << arguments.ids.size() << " ids plus " << generate << " generated need "
              << needed << " positions; the model takes at most " << max_length << std::endl;
    return 2;
  }
  try {
    torch::NoGradGuard no_grad;
    Decoder decoder(std::move(graphs));
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
