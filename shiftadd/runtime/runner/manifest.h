// The artifact manifest (NAME.json) as the runner needs it: checked, with every listed file verified
// against its SHA-256, and the VM function signatures (new "functions" key, or the older main-only form).
#ifndef SHIFTADD_RUNNER_MANIFEST_H_
#define SHIFTADD_RUNNER_MANIFEST_H_

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace shiftadd {

/*! \brief An error reported as "shiftadd-run: <message>"; exit code 2 for usage, 1 otherwise. */
class RunnerError : public std::runtime_error {
 public:
  RunnerError(const std::string& msg, int code = 1) : std::runtime_error(msg), code(code) {}
  int code;
};

struct InputSpec {
  std::string name;
  std::string dtype;
};

struct FunctionSpec {
  std::string name;
  std::vector<InputSpec> inputs;
  std::vector<std::string> outputs;
  std::vector<std::string> params;  // weight names, in the order the function takes them
};

struct Manifest {
  std::string path;         // NAME.json
  std::string params_path;  // NAME.params
  std::optional<int64_t> vocab_size;
  std::vector<int64_t> eos_token_ids;
  std::vector<std::string> params;
  FunctionSpec main;
  std::optional<FunctionSpec> decode;  // decode_step, else decode_one, else decode; absent: rerun main
  std::optional<FunctionSpec> resize;  // kv_resize, with decode_step: the prompt's cache -> preallocated
  std::optional<FunctionSpec> prefill;  // prefill_last: main with the last position's logits only
  std::optional<int64_t> max_context;  // kv_cache.max_context when given
};

/*! \brief The paths of an artifact from its .so path (must end in .so). */
std::string StemOf(const std::string& so_path);

/*! \brief Read NAME.json beside \p so_path, check it and verify every file it lists. */
Manifest ReadManifest(const std::string& so_path);

}  // namespace shiftadd

#endif  // SHIFTADD_RUNNER_MANIFEST_H_
