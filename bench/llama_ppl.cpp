// Perplexity of a GGUF model on given token windows, scored as `shiftadd eval` scores them: each
// window (one line of space-separated token ids) from an empty cache, no BOS added, every next
// token of the window. Built against libllama by bench/_llama_cpp.py.
//   llama-ppl MODEL.gguf WINDOWS.txt THREADS   ->   {"ppl": ..., "tokens": ...}
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "llama.h"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s MODEL.gguf WINDOWS.txt THREADS\n", argv[0]);
    return 2;
  }
  std::vector<std::vector<llama_token>> windows;
  std::ifstream in(argv[2]);
  for (std::string line; std::getline(in, line);) {
    std::istringstream s(line);
    std::vector<llama_token> w;
    for (long t; s >> t;) w.push_back(static_cast<llama_token>(t));
    if (w.size() >= 2) windows.push_back(w);
  }
  if (windows.empty()) {
    std::fprintf(stderr, "%s: no window of two or more tokens\n", argv[2]);
    return 2;
  }
  size_t longest = 0;
  for (auto& w : windows) longest = std::max(longest, w.size());
  llama_log_set([](ggml_log_level, const char*, void*) {}, nullptr);
  llama_backend_init();
  llama_model* model = llama_model_load_from_file(argv[1], llama_model_default_params());
  if (!model) {
    std::fprintf(stderr, "%s: cannot load\n", argv[1]);
    return 1;
  }
  llama_context_params cp = llama_context_default_params();
  cp.n_ctx = cp.n_batch = cp.n_ubatch = static_cast<uint32_t>(longest);
  cp.n_threads = cp.n_threads_batch = std::atoi(argv[3]);
  llama_context* ctx = llama_init_from_model(model, cp);
  const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
  double nll = 0;
  long count = 0;
  llama_batch batch = llama_batch_init(static_cast<int32_t>(longest), 0, 1);
  for (auto& w : windows) {
    llama_memory_clear(llama_get_memory(ctx), true);
    batch.n_tokens = static_cast<int32_t>(w.size());
    for (size_t i = 0; i < w.size(); ++i) {
      batch.token[i] = w[i];
      batch.pos[i] = static_cast<llama_pos>(i);
      batch.n_seq_id[i] = 1;
      batch.seq_id[i][0] = 0;
      batch.logits[i] = i + 1 < w.size();
    }
    if (llama_decode(ctx, batch) != 0) {
      std::fprintf(stderr, "llama_decode failed\n");
      return 1;
    }
    for (size_t i = 0; i + 1 < w.size(); ++i) {
      const float* z = llama_get_logits_ith(ctx, static_cast<int32_t>(i));
      double m = z[0];
      for (int v = 1; v < n_vocab; ++v) m = std::max(m, static_cast<double>(z[v]));
      double s = 0;
      for (int v = 0; v < n_vocab; ++v) s += std::exp(z[v] - m);
      nll += m + std::log(s) - z[w[i + 1]];
      ++count;
    }
  }
  llama_batch_free(batch);
  llama_free(ctx);
  llama_model_free(model);
  std::printf("{\"ppl\": %.6f, \"tokens\": %ld}\n", std::exp(nll / count), count);
  return 0;
}
