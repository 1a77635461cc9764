#include "manifest.h"

#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/string.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "sha256.h"

namespace shiftadd {
namespace {

namespace fs = std::filesystem;
namespace json = tvm::ffi::json;
using tvm::ffi::Any;

constexpr int64_t kFormatVersion = 2;

/*! \brief The JSON kind of a parsed value, for messages. */
std::string Kind(const Any& v) {
  if (v == nullptr) return "null";
  if (v.as<tvm::ffi::String>()) return "a string";
  if (v.as<int64_t>()) return "an integer";
  if (v.as<bool>()) return "a boolean";
  if (v.as<double>()) return "a number";
  if (v.as<json::Array>()) return "a list";
  if (v.as<json::Object>()) return "an object";
  return v.GetTypeKey();
}

/*! \brief Typed access to one JSON object, with errors that name the manifest and the key path. */
class Reader {
 public:
  Reader(std::string file, std::string where, json::Object obj)
      : file_(std::move(file)), where_(std::move(where)), obj_(std::move(obj)) {}

  bool Has(const std::string& key) const {
    auto it = obj_.find(tvm::ffi::String(key));
    return it != obj_.end() && (*it).second != nullptr;
  }
  Any Get(const std::string& key) const {
    auto it = obj_.find(tvm::ffi::String(key));
    if (it == obj_.end()) Fail(key, "is missing");
    return (*it).second;
  }
  std::string Str(const Any& v, const std::string& key) const {
    if (auto s = v.as<tvm::ffi::String>()) return std::string(*s);
    Fail(key, "must be a string, got " + Kind(v));
  }
  int64_t Int(const Any& v, const std::string& key) const {
    if (auto i = v.as<int64_t>()) return *i;
    Fail(key, "must be an integer, got " + Kind(v));
  }
  json::Array List(const Any& v, const std::string& key) const {
    if (auto a = v.as<json::Array>()) return *a;
    Fail(key, "must be a list, got " + Kind(v));
  }
  Reader Obj(const Any& v, const std::string& key) const {
    if (auto o = v.as<json::Object>()) return Reader(file_, Path(key), *o);
    Fail(key, "must be an object, got " + Kind(v));
  }
  std::vector<std::string> StrList(const std::string& key) const {
    std::vector<std::string> out;
    for (const Any& v : List(Get(key), key)) out.push_back(Str(v, key + "[]"));
    return out;
  }
  const json::Object& obj() const { return obj_; }
  const std::string& file() const { return file_; }
  [[noreturn]] void Fail(const std::string& key, const std::string& what) const {
    throw RunnerError(file_ + ": manifest key '" + Path(key) + "' " + what);
  }

 private:
  std::string Path(const std::string& key) const { return where_.empty() ? key : where_ + "." + key; }
  std::string file_, where_;
  json::Object obj_;
};

FunctionSpec ReadFunction(const Reader& r, const std::string& name) {
  FunctionSpec f;
  f.name = name;
  for (const Any& v : r.List(r.Get("inputs"), "inputs")) {
    Reader in = r.Obj(v, "inputs[]");
    f.inputs.push_back({in.Str(in.Get("name"), "name"), in.Str(in.Get("dtype"), "dtype")});
  }
  f.outputs = r.StrList("outputs");
  f.params = r.StrList("params");
  return f;
}

// The manifest hashes itself: SHA-256 of its text with the manifest_sha256 value replaced by 64 zeros
// (shiftadd/runtime/artifact.py, manifest_digest), so no flipped bit in it goes unnoticed.
void VerifyDigest(const Reader& r, std::string text, const std::string& path) {
  const std::string want = r.Str(r.Get("manifest_sha256"), "manifest_sha256");
  const std::string key = "\"manifest_sha256\": \"";
  const size_t i = text.find(key);
  if (i == std::string::npos || want.size() != 64 || i + key.size() + 64 > text.size()) {
    throw RunnerError(path + ": corrupted manifest (no valid manifest_sha256)");
  }
  text.replace(i + key.size(), 64, std::string(64, '0'));
  Sha256 h;
  h.Update(text.data(), text.size());
  if (h.HexDigest() != want) {
    throw RunnerError(path + ": corrupted manifest (its content does not match its manifest_sha256)");
  }
}

void VerifyFiles(const Reader& r, const fs::path& base) {
  if (!r.Has("files")) r.Fail("files", "is missing (the file hashes cannot be checked)");
  Reader files = r.Obj(r.Get("files"), "files");
  for (const auto& kv : files.obj()) {
    std::string rel = files.Str(kv.first, "files");
    std::string want = files.Str(kv.second, rel);
    fs::path p = base / rel;
    std::error_code ec;
    if (fs::path(rel).is_absolute() || !fs::is_regular_file(p, ec)) {
      throw RunnerError(p.string() + ": missing (listed in " + r.file() + "; the artifact is incomplete)");
    }
    std::string got = Sha256File(p.string());
    if (got != want) {
      throw RunnerError(p.string() + ": SHA-256 " + got + " does not match the manifest's " + want +
                        " (corrupted or replaced file)");
    }
  }
}

}  // namespace

std::string StemOf(const std::string& so_path) {
  if (so_path.size() < 4 || so_path.compare(so_path.size() - 3, 3, ".so") != 0) {
    throw RunnerError("artifact '" + so_path + "': expected a path ending in .so", 2);
  }
  return so_path.substr(0, so_path.size() - 3);
}

Manifest ReadManifest(const std::string& so_path) {
  std::string stem = StemOf(so_path);
  Manifest m;
  m.path = stem + ".json";
  m.params_path = stem + ".params";
  std::error_code ec;
  if (!fs::is_regular_file(so_path, ec)) throw RunnerError(so_path + ": artifact not found");
  if (!fs::is_regular_file(m.path, ec)) {
    throw RunnerError(m.path + ": manifest is missing (incomplete or foreign artifact; "
                      "shiftadd compile writes it last)");
  }
  std::ifstream in(m.path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  if (!in) throw RunnerError(m.path + ": cannot read the manifest");
  const std::string text = ss.str();
  tvm::ffi::String err;
  Any root = json::Parse(text, &err);
  if (!err.empty()) throw RunnerError(m.path + ": corrupted manifest (" + std::string(err) + ")");
  auto obj = root.as<json::Object>();
  if (!obj) throw RunnerError(m.path + ": corrupted manifest (expected a JSON object)");
  Reader r(m.path, "", *obj);

  Any version = r.Get("format_version");
  auto v = version.as<int64_t>();
  if (!v || *v != kFormatVersion) {
    throw RunnerError(m.path + ": format version " + (v ? std::to_string(*v) : Kind(version)) +
                      ", this runner reads version " + std::to_string(kFormatVersion));
  }
  VerifyDigest(r, text, m.path);
  VerifyFiles(r, fs::path(so_path).parent_path());

  m.params = r.StrList("params");
  if (r.Has("vocab_size")) {
    m.vocab_size = r.Int(r.Get("vocab_size"), "vocab_size");
    if (*m.vocab_size <= 0) r.Fail("vocab_size", "must be positive");
  }
  if (r.Has("eos_token_ids")) {
    for (const Any& e : r.List(r.Get("eos_token_ids"), "eos_token_ids")) {
      m.eos_token_ids.push_back(r.Int(e, "eos_token_ids[]"));
    }
  }
  if (r.Has("functions")) {
    Reader fns = r.Obj(r.Get("functions"), "functions");
    m.main = ReadFunction(fns.Obj(fns.Get("main"), "main"), "main");
    // one sequence, one token per step: decode_step (a preallocated cache written in place, with
    // kv_resize to make it), else decode_one (static shapes, less VM work), where the artifact has them
    if (fns.Has("decode_step") && fns.Has("kv_resize")) {
      m.decode = ReadFunction(fns.Obj(fns.Get("decode_step"), "decode_step"), "decode_step");
      m.resize = ReadFunction(fns.Obj(fns.Get("kv_resize"), "kv_resize"), "kv_resize");
    }
    for (const char* name : {"decode_one", "decode"}) {
      if (!m.decode && fns.Has(name)) m.decode = ReadFunction(fns.Obj(fns.Get(name), name), name);
    }
    if (fns.Has("prefill_last")) m.prefill = ReadFunction(fns.Obj(fns.Get("prefill_last"), "prefill_last"), "prefill_last");
  } else {  // older artifacts: main(inputs..., weights in "params" order) only
    m.main.name = "main";
    for (const Any& v : r.List(r.Get("inputs"), "inputs")) {
      Reader in = r.Obj(v, "inputs[]");
      m.main.inputs.push_back({in.Str(in.Get("name"), "name"), in.Str(in.Get("dtype"), "dtype")});
    }
    m.main.outputs = r.StrList("outputs");
    m.main.params = m.params;
  }
  if (r.Has("kv_cache")) {
    Reader kv = r.Obj(r.Get("kv_cache"), "kv_cache");
    if (kv.Has("max_context")) m.max_context = kv.Int(kv.Get("max_context"), "max_context");
  }
  return m;
}

}  // namespace shiftadd
