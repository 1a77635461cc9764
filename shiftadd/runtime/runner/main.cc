// shiftadd-run: load a shiftadd artifact with the TVM runtime alone and decode greedily.
//
//   shiftadd-run ARTIFACT.so --ids "504 3575 282" [--max-new-tokens N] [--threads T]
//
// Threads: --threads, else $TVM_NUM_THREADS, else every physical core (TVM alone takes half the
// logical CPUs: one of the two cores of a 2-core VM without SMT).
// stdout: "ids: <new ids>" then "timing: {json}". Errors: "shiftadd-run: ..." on stderr,
// exit 2 for usage errors (arguments), 1 for everything else.
#include <dlpack/dlpack.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "manifest.h"

namespace shiftadd {
namespace {

namespace ffi = tvm::ffi;
using Clock = std::chrono::steady_clock;

constexpr const char* kUsage =
    "usage: shiftadd-run ARTIFACT.so --ids \"ID ID ...\" [--max-new-tokens N (default 16)] "
    "[--threads T]\n";

struct Options {
  std::string so_path;
  std::vector<int64_t> ids;
  int64_t max_new_tokens = 16;
  int threads = 0;  // 0: $TVM_NUM_THREADS, else every physical core
};

[[noreturn]] void Usage(const std::string& msg) { throw RunnerError(msg, 2); }

// Cores (not SMT siblings) among the CPUs this process may run on; 0 if unknown.
int PhysicalCores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return 0;
  std::set<std::pair<std::string, std::string>> cores;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (!CPU_ISSET(cpu, &set)) continue;
    std::string topo = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/";
    std::ifstream pkg(topo + "physical_package_id"), core(topo + "core_id");
    std::string p, c;
    if (!(pkg >> p) || !(core >> c)) return CPU_COUNT(&set);  // no topology: logical CPUs
    cores.insert({p, c});
  }
  return static_cast<int>(cores.size());
}

int64_t ParseInt(const std::string& s, const std::string& what) {
  if (s.empty()) Usage(what + ": expected an integer, got an empty string");
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(s.c_str(), &end, 10);
  if (*end != '\0' || errno == ERANGE) Usage(what + ": expected an integer, got '" + s + "'");
  return v;
}

std::vector<int64_t> ParseIds(const std::string& s) {
  std::vector<int64_t> ids;
  std::string tok;
  std::string spaced = s;
  std::replace(spaced.begin(), spaced.end(), ',', ' ');
  std::istringstream words(spaced);
  while (words >> tok) ids.push_back(ParseInt(tok, "--ids"));
  if (ids.empty()) Usage("--ids: expected one or more token ids (e.g. --ids \"504 3575 282\"), got '" + s + "'");
  return ids;
}

Options ParseArgs(int argc, char** argv) {
  Options o;
  bool have_ids = false;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i], value;
    if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    }
    if (a.rfind("--", 0) != 0 || a == "--") {
      positional.push_back(a);
      continue;
    }
    auto eq = a.find('=');
    std::string key = a.substr(0, eq);
    if (key != "--ids" && key != "--max-new-tokens" && key != "--threads") {
      Usage("unknown option '" + key + "' (options: --ids, --max-new-tokens, --threads)");
    }
    if (eq != std::string::npos) {
      value = a.substr(eq + 1);
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      Usage(key + ": missing its value");
    }
    if (key == "--ids") {
      o.ids = ParseIds(value);
      have_ids = true;
    } else if (key == "--max-new-tokens") {
      o.max_new_tokens = ParseInt(value, key);
      if (o.max_new_tokens < 0) Usage(key + ": expected an integer >= 0, got " + value);
    } else {
      int64_t t = ParseInt(value, key);
      if (t < 1 || t > 1024) Usage(key + ": expected an integer in [1, 1024], got " + value);
      o.threads = static_cast<int>(t);
    }
  }
  if (positional.size() != 1) {
    Usage(positional.empty() ? "missing the artifact path (ARTIFACT.so)"
                             : "expected one artifact path, got " + std::to_string(positional.size()));
  }
  o.so_path = positional[0];
  if (!have_ids) Usage("--ids is required (the prompt's token ids)");
  return o;
}

/*! \brief "kind: message" of a TVM error, without its backtrace. */
std::string Describe(const ffi::Error& e) {
  std::string msg = e.message();
  while (!msg.empty() && std::isspace(static_cast<unsigned char>(msg.back()))) msg.pop_back();
  return e.kind() + ": " + msg;
}

/*! \brief Run \p f, turning TVM errors into RunnerErrors prefixed with \p context. */
template <typename F>
auto WithContext(const std::string& context, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const ffi::Error& e) {
    throw RunnerError(context + ": " + Describe(e));
  }
}

/*! \brief Host memory for the runner's own small tensors (ids, masks); the VM allocates the rest. */
struct HostAlloc {
  void AllocData(DLTensor* t) {
    t->data = std::aligned_alloc(64, (ffi::GetDataSize(*t) + 63) / 64 * 64);
    if (!t->data) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

ffi::Tensor IdsTensor(const std::vector<int64_t>& ids) {
  int64_t shape[2] = {1, static_cast<int64_t>(ids.size())};
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(HostAlloc(), ffi::ShapeView(shape, 2), DLDataType{kDLInt, 64, 1},
                                           DLDevice{kDLCPU, 0});
  std::memcpy(t.data_ptr(), ids.data(), ids.size() * sizeof(int64_t));
  return t;
}

/*! \brief Argmax of the last position's logits (first maximum, NaN wins, like numpy.argmax). */
int64_t LastArgmax(const ffi::Tensor& logits, const std::string& fn) {
  if (logits.device().device_type != kDLCPU || logits.dtype().code != kDLFloat ||
      logits.dtype().bits != 32 || logits.ndim() != 3 || logits.shape()[0] != 1 ||
      logits.shape()[1] < 1 || !logits.IsContiguous()) {
    throw RunnerError("function '" + fn + "': expected logits as contiguous float32 [1, S, V] on the CPU");
  }
  int64_t s = logits.shape()[1], v = logits.shape()[2];
  const float* row = reinterpret_cast<const float*>(static_cast<const char*>(logits.data_ptr()) +
                                                    logits.byte_offset()) + (s - 1) * v;
  int64_t best = 0;
  for (int64_t i = 0; i < v; ++i) {
    if (std::isnan(row[i])) return i;
    if (row[i] > row[best]) best = i;
  }
  return best;
}

class Model {
 public:
  Model(const Options& opt, Manifest manifest) : m_(std::move(manifest)) {
    std::string so = std::filesystem::absolute(opt.so_path).string();  // dlopen needs a path with '/'
    ffi::Module lib = WithContext(opt.so_path + ": cannot be loaded by the TVM runtime",
                                  [&] { return ffi::Module::LoadFromFile(so); });
    vm_ = WithContext(opt.so_path + ": not a Relax VM executable", [&] {
      ffi::Function load = Lookup(lib, "vm_load_executable", opt.so_path);
      ffi::Module vm = load().cast<ffi::Module>();
      // one CPU device: (device type, index, allocator 2 = pooled), as relax.VirtualMachine does
      Lookup(vm, "vm_initialization", opt.so_path)(static_cast<int>(kDLCPU), 0, 2);
      return vm;
    });
    LoadParams();
    main_ = Bind(m_.main, opt.so_path, false);
    if (m_.decode) decode_ = Bind(*m_.decode, opt.so_path, true);
    if (m_.decode && m_.prefill) prefill_ = Bind(*m_.prefill, opt.so_path, false);
    if (m_.decode && m_.resize) resize_ = BindResize(*m_.resize, opt.so_path);
  }

  const Manifest& manifest() const { return m_; }
  bool has_cache() const { return m_.decode.has_value(); }

  /*! \brief Each layer's keys/values by suffix ("0.key"): output present.<s>, input past_key_values.<s>. */
  using Cache = std::map<std::string, ffi::Tensor>;
  static constexpr const char* kPast = "past_key_values.";
  static constexpr const char* kPresent = "present.";

  struct Step {
    int64_t next;
    Cache present;
  };

  enum class Fn { kPrefill, kMain, kDecode };

  /*! \brief The prompt's cache copied into tensors of \p capacity rows, which decode_step then
   *  extends in place; unchanged for artifacts without kv_resize (their decode grows the cache). */
  Cache Preallocate(const Cache& present, int64_t capacity) {
    if (!resize_) return present;
    std::vector<ffi::AnyView> args;
    std::vector<std::string> suffixes;
    for (const InputSpec& in : resize_->spec.inputs) {
      if (in.dtype == "shape") continue;
      std::string suffix = in.name.substr(std::strlen(kPast));
      auto it = present.find(suffix);
      if (it == present.end()) throw RunnerError("kv_resize: no cache tensor for input '" + in.name + "'");
      args.emplace_back(it->second);
      suffixes.push_back(suffix);
    }
    ffi::Shape size({capacity});
    args.emplace_back(size);
    ffi::Any rv;
    WithContext("function 'kv_resize' failed", [&] {
      resize_->fn.CallPacked(args.data(), static_cast<int32_t>(args.size()), &rv);
    });
    auto arr = rv.as<ffi::Array<ffi::Any>>();
    if (!arr || arr->size() != suffixes.size()) throw RunnerError("kv_resize: expected one cache tensor per input");
    Cache out;
    for (size_t i = 0; i < suffixes.size(); ++i) {
      auto t = (*arr)[i].as<ffi::Tensor>();
      if (!t) throw RunnerError("kv_resize: output " + std::to_string(i) + " is not a tensor");
      out[suffixes[i]] = *t;
    }
    return out;
  }

  /*! \brief One call of the prompt's prefill (prefill_last: the last position's logits only, where the
   *  artifact has it), main (a full rerun) or decode (with \p past). */
  Step Run(Fn which, const std::vector<int64_t>& ids, int64_t mask_len, const Cache& past) {
    const Bound& f = which == Fn::kDecode ? *decode_ : (which == Fn::kPrefill && prefill_) ? *prefill_ : main_;
    ffi::Tensor ids_t = IdsTensor(ids);
    ffi::Tensor mask_t = IdsTensor(std::vector<int64_t>(mask_len, 1));
    std::vector<ffi::AnyView> args;
    for (const InputSpec& in : f.spec.inputs) {
      if (in.name == "input_ids") {
        args.emplace_back(ids_t);
      } else if (in.name == "attention_mask") {
        args.emplace_back(mask_t);
      } else {  // past_key_values.<s> (checked in Bind)
        auto it = past.find(in.name.substr(std::strlen(kPast)));
        if (it == past.end()) throw RunnerError("no cache tensor for input '" + in.name + "'");
        args.emplace_back(it->second);
      }
    }
    for (const ffi::Tensor& w : f.weights) args.emplace_back(w);
    ffi::Any rv;
    WithContext("function '" + f.spec.name + "' failed", [&] {
      f.fn.CallPacked(args.data(), static_cast<int32_t>(args.size()), &rv);
    });
    std::vector<ffi::Any> outs;
    if (auto arr = rv.as<ffi::Array<ffi::Any>>()) {
      outs.assign(arr->begin(), arr->end());
    } else {
      outs.push_back(rv);
    }
    auto output = [&](int idx, const char* what) {
      if (idx < 0 || idx >= static_cast<int>(outs.size())) {
        throw RunnerError("function '" + f.spec.name + "' returned " + std::to_string(outs.size()) +
                          " output(s), expected " + what + " at position " + std::to_string(idx));
      }
      auto t = outs[idx].as<ffi::Tensor>();
      if (!t) throw RunnerError("function '" + f.spec.name + "': output " + what + " is not a tensor");
      return *t;
    };
    Step step{LastArgmax(output(f.logits_idx, "logits"), f.spec.name), {}};
    if (has_cache()) {
      for (const auto& [suffix, idx] : f.present) step.present[suffix] = output(idx, (kPresent + suffix).c_str());
    }
    return step;
  }

 private:
  struct Bound {
    FunctionSpec spec;
    ffi::Function fn;
    std::vector<ffi::Tensor> weights;
    int logits_idx = 0;
    std::map<std::string, int> present;  // suffix ("0.key") -> output index of present.<suffix>
  };

  static ffi::Function Lookup(const ffi::Module& mod, const std::string& name, const std::string& file) {
    ffi::Optional<ffi::Function> f = mod->GetFunction(name, true);
    if (!f.has_value()) throw RunnerError(file + ": the module has no function '" + name + "'");
    return *f;
  }

  void LoadParams() {
    // From the file: reading it into memory first would hold the 180 MB of SmolLM2's weights three
    // times at the peak (file bytes, their copy into ffi::Bytes, the tensors).
    std::ifstream probe(m_.params_path, std::ios::binary);
    if (!probe) throw RunnerError(m_.params_path + ": cannot open the weights file");
    probe.close();
    auto load = ffi::Function::GetGlobal("runtime.LoadParamsFromFile");
    if (!load) throw RunnerError("the TVM runtime has no runtime.LoadParamsFromFile (libtvm_runtime.so too old?)");
    auto map = WithContext(m_.params_path + ": cannot be read as a TVM parameter file", [&] {
      return (*load)(ffi::String(m_.params_path)).cast<ffi::Map<ffi::String, ffi::Tensor>>();
    });
    for (const auto& kv : map) params_.emplace(std::string(kv.first), kv.second);
    for (const std::string& name : m_.params) {
      if (!params_.count(name)) {
        throw RunnerError(m_.params_path + ": weight '" + name + "' listed in the manifest is missing");
      }
    }
    MoveToHugePages();
  }

  /*! \brief Hands out slices of the huge-page region as tensor data (the region outlives them). */
  struct RegionSlice {
    void* data;
    void AllocData(DLTensor* t) { t->data = data; }
    void FreeData(DLTensor*) {}
  };

  /*! \brief The weights copied into one 2 MiB-aligned region marked MADV_HUGEPAGE before its first
   *  touch, as the Python session does (runtime/huge_pages.py says why); left where they are when
   *  the kernel offers no transparent huge pages. */
  void MoveToHugePages() {
    constexpr size_t kHuge = size_t{2} << 20, kAlign = 64;
    std::ifstream thp("/sys/kernel/mm/transparent_hugepage/enabled");
    std::string mode((std::istreambuf_iterator<char>(thp)), std::istreambuf_iterator<char>());
    if (mode.find("[madvise]") == std::string::npos && mode.find("[always]") == std::string::npos) return;
    auto up = [](size_t n, size_t a) { return (n + a - 1) / a * a; };
    size_t total = 0;
    auto bytes_of = [](const ffi::Tensor& t) { return ffi::GetDataSize(static_cast<size_t>(t.numel()), t.dtype()); };
    for (const std::string& name : m_.params) total += up(bytes_of(params_.at(name)), kAlign);
    if (total == 0) return;
    size_t length = up(total, kHuge) + kHuge;
    void* base = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return;
    region_ = std::shared_ptr<void>(base, [length](void* p) { munmap(p, length); });
    char* start = reinterpret_cast<char*>(up(reinterpret_cast<uintptr_t>(base), kHuge));
    madvise(start, up(total, kHuge), MADV_HUGEPAGE);
    size_t pos = 0;
    for (const std::string& name : m_.params) {
      const ffi::Tensor& t = params_.at(name);
      size_t bytes = bytes_of(t);
      std::memcpy(start + pos, static_cast<const char*>(t.data_ptr()) + t.byte_offset(), bytes);
      params_[name] = ffi::Tensor::FromNDAlloc(RegionSlice{start + pos}, t.shape(), t.dtype(), t.device());
      pos += up(bytes, kAlign);
    }
  }

  Bound BindResize(const FunctionSpec& spec, const std::string& so) {
    Bound b;
    b.spec = spec;
    ffi::Optional<ffi::Function> fn = (*vm_)->GetFunction(spec.name);
    if (!fn.has_value()) throw RunnerError(so + ": the VM executable has no function '" + spec.name + "'");
    b.fn = *fn;
    int shapes = 0;
    for (const InputSpec& in : spec.inputs) {
      bool past = in.name.rfind(kPast, 0) == 0 && in.dtype == "float32";
      shapes += in.dtype == "shape";
      if (!past && in.dtype != "shape") {
        throw RunnerError(m_.path + ": function '" + spec.name + "' input '" + in.name + "' (" + in.dtype +
                          ") is not one the runner can feed (past_key_values.* float32, one shape)");
      }
    }
    if (shapes != 1) throw RunnerError(m_.path + ": function '" + spec.name + "' must take one shape (the capacity)");
    return b;
  }

  Bound Bind(const FunctionSpec& spec, const std::string& so, bool decode) {
    Bound b;
    b.spec = spec;
    ffi::Optional<ffi::Function> fn = (*vm_)->GetFunction(spec.name);
    if (!fn.has_value()) {
      throw RunnerError(so + ": the VM executable has no function '" + spec.name + "' (listed in " +
                        m_.path + ")");
    }
    b.fn = *fn;
    auto is_past = [](const std::string& n) { return n.rfind(kPast, 0) == 0 && n.size() > std::strlen(kPast); };
    for (const InputSpec& in : spec.inputs) {
      bool ok = (in.name == "input_ids" || in.name == "attention_mask") ? in.dtype == "int64"
                : (decode && is_past(in.name)) ? in.dtype == "float32"
                                               : false;
      if (!ok) {
        throw RunnerError(m_.path + ": function '" + spec.name + "' input '" + in.name + "' (" + in.dtype +
                          ") is not one the runner can feed (input_ids/attention_mask int64" +
                          (decode ? ", past_key_values.* float32)" : ")"));
      }
    }
    auto has_input = [&](const char* n) {
      return std::any_of(spec.inputs.begin(), spec.inputs.end(), [&](const InputSpec& i) { return i.name == n; });
    };
    bool has_past = std::any_of(spec.inputs.begin(), spec.inputs.end(), [&](const InputSpec& i) { return is_past(i.name); });
    if (!has_input("input_ids") || (decode && !has_past)) {
      throw RunnerError(m_.path + ": function '" + spec.name + "' must take input_ids" +
                        (decode ? " and past_key_values.*" : ""));
    }
    for (const std::string& name : spec.params) {
      auto it = params_.find(name);
      if (it == params_.end()) {
        throw RunnerError(m_.params_path + ": weight '" + name + "' (taken by function '" + spec.name +
                          "') is missing");
      }
      b.weights.push_back(it->second);
    }
    auto index = [&](const std::string& name) {
      auto it = std::find(spec.outputs.begin(), spec.outputs.end(), name);
      return it == spec.outputs.end() ? -1 : static_cast<int>(it - spec.outputs.begin());
    };
    b.logits_idx = std::max(index("logits"), 0);
    if (m_.decode) {  // every past input of decode must come back as a present output of this function
      for (int i = 0; i < static_cast<int>(spec.outputs.size()); ++i) {
        if (spec.outputs[i].rfind(kPresent, 0) == 0) b.present[spec.outputs[i].substr(std::strlen(kPresent))] = i;
      }
      for (const InputSpec& in : m_.decode->inputs) {
        if (is_past(in.name) && !b.present.count(in.name.substr(std::strlen(kPast)))) {
          throw RunnerError(m_.path + ": function '" + spec.name + "' has no output 'present." +
                            in.name.substr(std::strlen(kPast)) + "' for decode's input '" + in.name + "'");
        }
      }
    }
    // The executable's own arity, when it tells: a clear message instead of a VM argument error.
    if (auto arity_fn = (*vm_)->GetFunction("get_function_arity")) {
      try {
        int64_t arity = (*arity_fn)(ffi::String(spec.name)).cast<int64_t>();
        int64_t want = static_cast<int64_t>(spec.inputs.size() + spec.params.size());
        if (arity >= 0 && arity != want) {
          throw RunnerError(m_.path + ": function '" + spec.name + "' is listed with " +
                            std::to_string(spec.inputs.size()) + " inputs + " +
                            std::to_string(spec.params.size()) + " weights, but " + so + " takes " +
                            std::to_string(arity) + " arguments");
        }
      } catch (const ffi::Error&) {  // arity not available: the call itself will tell
      }
    }
    return b;
  }

  Manifest m_;
  std::optional<ffi::Module> vm_;
  std::shared_ptr<void> region_;  // the weights' huge-page region: declared first, freed after them
  std::map<std::string, ffi::Tensor> params_;
  Bound main_;
  std::optional<Bound> decode_, prefill_, resize_;
};

double Ms(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// Peak resident memory of this process in MB: VmHWM of /proc/self/status (the mm made by exec).
// getrusage's ru_maxrss also counts the parent's memory at fork time on Linux (it survives exec), so a
// runner started by a big process (a benchmark, a test) would report that process's peak.
double PeakRssMb() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::strtod(line.c_str() + 6, nullptr) / 1024.0;
  }
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss / 1024.0;
}

std::string Num(double v, int digits = 3) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.*f", digits, v);
  return buf;
}

int Run(int argc, char** argv) {
  auto t_start = Clock::now();
  Options opt = ParseArgs(argc, argv);
  if (opt.threads > 0) {
    setenv("TVM_NUM_THREADS", std::to_string(opt.threads).c_str(), 1);
  } else if (const char* env = std::getenv("TVM_NUM_THREADS"); env == nullptr || std::atoi(env) < 1) {
    if (int cores = PhysicalCores(); cores > 0) setenv("TVM_NUM_THREADS", std::to_string(cores).c_str(), 1);
  }

  Manifest m = ReadManifest(opt.so_path);  // checks the manifest and every file's SHA-256
  if (m.vocab_size) {
    for (int64_t id : opt.ids) {
      if (id < 0 || id >= *m.vocab_size) {
        Usage("--ids: token id " + std::to_string(id) + " is out of range: expected ids in [0, " +
              std::to_string(*m.vocab_size) + ") (vocab_size in " + m.path + ")");
      }
    }
  } else {
    for (int64_t id : opt.ids) {
      if (id < 0) Usage("--ids: token id " + std::to_string(id) + " is negative");
    }
  }
  int64_t longest = static_cast<int64_t>(opt.ids.size()) + std::max<int64_t>(opt.max_new_tokens - 1, 0);
  if (m.max_context && longest > *m.max_context) {
    Usage("--max-new-tokens: " + std::to_string(opt.ids.size()) + " prompt ids + " +
          std::to_string(opt.max_new_tokens) + " new tokens need a context of " + std::to_string(longest) +
          ", the model's is " + std::to_string(*m.max_context));
  }
  Model model(opt, m);
  double load_s = std::chrono::duration<double>(Clock::now() - t_start).count();

  std::vector<int64_t> seq = opt.ids, out;
  std::vector<double> step_ms;
  auto t0 = Clock::now();
  Model::Step step = model.Run(Model::Fn::kPrefill, seq, static_cast<int64_t>(seq.size()), {});
  if (model.has_cache() && opt.max_new_tokens > 1) step.present = model.Preallocate(step.present, longest);
  double prefill_ms = Ms(t0, Clock::now());
  auto is_eos = [&](int64_t id) {
    return std::find(m.eos_token_ids.begin(), m.eos_token_ids.end(), id) != m.eos_token_ids.end();
  };
  while (static_cast<int64_t>(out.size()) < opt.max_new_tokens) {
    out.push_back(step.next);
    seq.push_back(step.next);
    if (is_eos(step.next) || static_cast<int64_t>(out.size()) == opt.max_new_tokens) break;
    auto ts = Clock::now();
    if (model.has_cache()) {  // one new token against the cache
      step = model.Run(Model::Fn::kDecode, {step.next}, static_cast<int64_t>(seq.size()), step.present);
    } else {  // no cache: rerun main over the whole sequence
      step = model.Run(Model::Fn::kMain, seq, static_cast<int64_t>(seq.size()), {});
    }
    step_ms.push_back(Ms(ts, Clock::now()));
  }

  std::string median = "null";
  if (!step_ms.empty()) {
    std::sort(step_ms.begin(), step_ms.end());
    size_t n = step_ms.size();
    median = Num(n % 2 ? step_ms[n / 2] : (step_ms[n / 2 - 1] + step_ms[n / 2]) / 2);
  }
  int64_t threads = -1;
  if (auto nt = ffi::Function::GetGlobal("runtime.NumThreads")) threads = (*nt)().cast<int64_t>();

  std::string line = "ids:";
  for (int64_t id : out) line += " " + std::to_string(id);
  std::printf("%s\n", line.c_str());
  std::printf(
      "timing: {\"load_s\": %s, \"prefill_ms\": %s, \"decode_ms_per_token\": %s, \"tokens\": %zu, "
      "\"peak_rss_mb\": %s, \"kv_cache\": %s, \"threads\": %lld}\n",
      Num(load_s, 4).c_str(), Num(prefill_ms).c_str(), median.c_str(), out.size(),
      Num(PeakRssMb(), 1).c_str(), model.has_cache() ? "true" : "false",
      static_cast<long long>(threads));
  std::fflush(stdout);
  return 0;
}

}  // namespace
}  // namespace shiftadd

int main(int argc, char** argv) {
  try {
    return shiftadd::Run(argc, argv);
  } catch (const shiftadd::RunnerError& e) {
    std::fprintf(stderr, "shiftadd-run: %s\n", e.what());
    if (e.code == 2) std::fputs(shiftadd::kUsage, stderr);
    return e.code;
  } catch (const tvm::ffi::Error& e) {
    std::fprintf(stderr, "shiftadd-run: TVM error: %s\n", shiftadd::Describe(e).c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "shiftadd-run: %s\n", e.what());
    return 1;
  }
}
