// The Python package `kiln` (pybind11): export, inspect and the serving API of engine/engine.h for
// regression tests written in Python (docs/regression-testing.md). One extension module, so that
// `import kiln` works from the build tree (PYTHONPATH=build) and from an installed prefix alike.
//
// Every kiln::Error becomes kiln.Error with the message the CLI prints after "kiln: error: ".
// Forward passes release the GIL; logits come back as numpy arrays that own their buffer (no copy).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/error.h"
#include "engine/artifact.h"
#include "engine/engine.h"
#include "engine/inspect.h"
#include "engine/sampling.h"
#include "export/exporter.h"
#include "tokenizer/tokenizer.h"
#include "tools/kiln/common.h"
#include "tools/kiln/export_request.h"

namespace py = pybind11;

namespace kiln::python {
namespace {

// nlohmann JSON → Python objects, through Python's json module (exact for every JSON value).
py::object to_python(const nlohmann::ordered_json& j) {
  return py::module_::import("json").attr("loads")(j.dump());
}

// The sampling keywords every prefill takes, read as `kiln run` reads its options.
SamplingParams sampling_params(const std::optional<std::string>& sampling,
                               std::optional<float> temperature, int32_t top_k, float top_p,
                               uint64_t seed, const std::vector<int32_t>& stop,
                               int64_t max_tokens) {
  SamplingParams sp;
  sp.top_k = top_k;
  sp.top_p = top_p;
  sp.seed = seed;
  sp.stop_tokens = stop;
  sp.max_new_tokens = max_tokens;
  resolve_sampling_algorithm(sp, sampling, temperature);
  return sp;
}

#define KILN_SAMPLING_ARGS                                                                     \
  py::arg("sampling") = py::none(), py::arg("temperature") = py::none(), py::arg("top_k") = 0, \
  py::arg("top_p") = 1.0f, py::arg("seed") = 0, py::arg("stop") = std::vector<int32_t>{},      \
  py::arg("max_tokens") = 0

py::dict slot_token(const SlotToken& t) {
  py::dict d;
  d["slot"] = t.slot;
  d["token"] = t.token;
  d["logp"] = t.logp;
  d["finish"] = t.finish == FinishReason::None ? py::object(py::none())
                                               : py::object(py::str(finish_reason_name(t.finish)));
  return d;
}

// A prefilled prompt held for insert(); its logits are a numpy view kept alive by this object.
struct PyPrefix {
  std::optional<Prefix> prefix;
  Prefix& get() {
    if (!prefix) throw StateError("this prefix was already inserted into a slot");
    return *prefix;
  }
};

class PyEngine {
 public:
  PyEngine(const std::string& path, int64_t slots, std::optional<int> threads, int64_t max_seq_len,
           bool relayout, bool verify, bool adapt_threads) {
    EngineOptions eo;
    eo.slots = slots;
    eo.max_seq_len = max_seq_len;
    eo.model.threads = threads.value_or(0);
    eo.model.relayout = relayout;
    eo.model.verify_checksums = verify;
    eo.model.adapt_threads = adapt_threads;
    py::gil_scoped_release nogil;
    engine_ = Engine::open(path, eo);
    path_ = path;
  }

  Engine& engine() { return *engine_; }

  // [T, vocab] f32 logits of a fresh prefill of `tokens`: the path of `kiln golden dump`, which
  // also loads the named adapter first.
  py::array_t<float> logits(const std::vector<int32_t>& tokens,
                            const std::optional<std::string>& adapter) {
    const int64_t vocab = engine_->config().vocab_size;
    auto out = py::array_t<float>({int64_t(tokens.size()), vocab});
    float* data = out.mutable_data();
    py::gil_scoped_release nogil;
    if (adapter) engine_->load_adapter(*adapter);
    engine_->prefill_logits(tokens, data, adapter.value_or(""));
    return out;
  }

  std::unique_ptr<PyPrefix> prefill(const std::vector<int32_t>& tokens, int64_t n,
                                    const SamplingParams& sp, const std::string& adapter) {
    auto p = std::make_unique<PyPrefix>();
    py::gil_scoped_release nogil;
    p->prefix = n == 1 ? engine_->prefill(tokens, sp, adapter)
                       : engine_->prefill_multisampling(tokens, n, sp, adapter);
    return p;
  }

  std::vector<std::unique_ptr<PyPrefix>> prefill_concat(
      const std::vector<std::vector<int32_t>>& prompts,
      const std::optional<std::vector<std::string>>& adapters, const SamplingParams& sp) {
    if (adapters && adapters->size() != prompts.size())
      throw Error("prefill_concat: " + std::to_string(adapters->size()) + " adapters for " +
                  std::to_string(prompts.size()) + " prompts");
    std::vector<PrefillRequest> reqs(prompts.size());
    for (size_t i = 0; i < prompts.size(); ++i)
      reqs[i] = {prompts[i], sp, adapters ? (*adapters)[i] : std::string()};
    std::vector<Prefix> got;
    {
      py::gil_scoped_release nogil;
      got = engine_->prefill_concat(reqs);
    }
    std::vector<std::unique_ptr<PyPrefix>> out;
    for (Prefix& p : got) {
      out.push_back(std::make_unique<PyPrefix>());
      out.back()->prefix = std::move(p);
    }
    return out;
  }

  py::dict insert(PyPrefix& p, int64_t slot) {
    Prefix& prefix = p.get();
    SlotToken t;
    {
      py::gil_scoped_release nogil;
      t = engine_->insert(std::move(prefix), slot);
    }
    p.prefix.reset();
    return slot_token(t);
  }

  py::list bulk_insert(PyPrefix& p, const std::vector<int64_t>& slots) {
    Prefix& prefix = p.get();
    std::vector<SlotToken> got;
    {
      py::gil_scoped_release nogil;
      got = engine_->bulk_insert(std::move(prefix), slots);
    }
    p.prefix.reset();
    py::list out;
    for (const SlotToken& t : got) out.append(slot_token(t));
    return out;
  }

  py::list generate() {
    std::vector<SlotToken> got;
    {
      py::gil_scoped_release nogil;
      const std::span<const SlotToken> s = engine_->generate();
      got.assign(s.begin(), s.end());
    }
    py::list out;
    for (const SlotToken& t : got) out.append(slot_token(t));
    return out;
  }

  const std::string& path() const { return path_; }

 private:
  std::unique_ptr<Engine> engine_;
  std::string path_;
};

// generate_text: a streaming iterator over the continuation of a text prompt, in its own slot.
class TextGeneration {
 public:
  TextGeneration(PyEngine& e, py::object owner, const std::string& prompt, const SamplingParams& sp)
      : e_(e), owner_(std::move(owner)) {
    Engine& engine = e_.engine();
    tok_ = &cli::require_tokenizer(
        engine, e_.path(), "generate_text cannot take text; give token ids to prefill instead");
    for (int64_t s = 0; s < engine.slots(); ++s)
      if (!engine.slot_busy(s)) {
        slot_ = s;
        break;
      }
    if (slot_ < 0) throw StateError("generate_text: every slot is busy (release one first)");
    SamplingParams with_eos = sp;
    if (with_eos.stop_tokens.empty() && tok_->eos_id() >= 0)
      with_eos.stop_tokens = {tok_->eos_id()};
    const std::vector<int32_t> ids = cli::text_prompt(*tok_, prompt);
    stream_.emplace(*tok_);
    SlotToken first;
    {
      py::gil_scoped_release nogil;
      first = engine.insert(engine.prefill(ids, with_eos), slot_);
    }
    pending_ = stream_->push(first.token);
    finished_ = first.finish != FinishReason::None;
  }
  ~TextGeneration() { release(); }

  std::string next() {
    while (pending_.empty()) {
      if (finished_) {
        std::string rest = stream_ ? stream_->finish() : std::string();
        release();
        if (rest.empty()) throw py::stop_iteration();
        return rest;
      }
      Engine& engine = e_.engine();
      std::vector<SlotToken> step;
      {
        py::gil_scoped_release nogil;
        const std::span<const SlotToken> s = engine.generate();
        step.assign(s.begin(), s.end());
      }
      for (const SlotToken& t : step) {
        if (t.slot != slot_) continue;
        pending_ += stream_->push(t.token);
        finished_ = t.finish != FinishReason::None;
      }
    }
    return std::exchange(pending_, std::string());
  }

 private:
  void release() {
    if (slot_ >= 0 && e_.engine().slot_busy(slot_)) e_.engine().release(slot_);
    slot_ = -1;
    stream_.reset();
  }

  PyEngine& e_;
  py::object owner_;  // keeps the Python Engine alive while iterating
  const Tokenizer* tok_ = nullptr;
  int64_t slot_ = -1;
  std::optional<TextStream> stream_;
  std::string pending_;
  bool finished_ = false;
};

py::dict export_artifact_py(
    const std::vector<std::string>& checkpoint, const std::string& config, const std::string& out,
    const std::vector<std::string>& overrides, std::optional<int> scan_axis,
    const std::vector<std::string>& max_logits, std::optional<double> qk_clip_threshold,
    bool qk_clip_per_group, const std::optional<std::string>& qk_clip_mode,
    const std::optional<std::string>& qk_clip_calibrate, const std::vector<std::string>& lora,
    const std::vector<std::string>& lora_name, std::optional<double> lora_scale, bool merge_lora,
    const std::optional<std::string>& tokenizer, bool force,
    const std::optional<std::string>& weights_layout) {
  cli::ExportRequest r;
  r.checkpoints = checkpoint;
  r.config = config;
  r.set = overrides;
  r.scan_axis = scan_axis;
  r.out = out;
  r.max_logits = max_logits;
  r.qk_clip_threshold = qk_clip_threshold;
  r.qk_clip_per_group = qk_clip_per_group;
  r.qk_clip_mode = qk_clip_mode;
  r.qk_clip_calibrate = qk_clip_calibrate;
  r.lora = lora;
  r.lora_name = lora_name;
  r.lora_scale = lora_scale;
  r.merge_lora = merge_lora;
  r.tokenizer = tokenizer;
  r.force = force;
  r.weights_layout = weights_layout;
  const cli::PreparedExport prepared = cli::prepare_export(
      r, cli::OptionSpelling::Python, [](const std::string& m) { return UsageError(m); });
  const ExportOptions& opt = prepared.options;
  ExportSummary s;
  {
    py::gil_scoped_release nogil;
    s = export_artifact(opt);
  }
  py::dict d;
  d["out"] = opt.out_dir;
  d["layers"] = s.layers;
  d["bytes_written"] = s.bytes_written;
  d["key_layout"] = s.key_layout;
  d["scanned"] = s.scanned;
  d["seconds"] = s.seconds;
  d["tokenizer_pieces"] = s.tokenizer_pieces;
  if (s.qk_clip.applied) {
    py::dict q;
    q["threshold"] = s.qk_clip.threshold;
    q["mode"] = s.qk_clip.mode;
    q["per_group"] = s.qk_clip.per_group;
    q["heads_clipped"] = s.qk_clip.clipped_heads();
    q["heads"] = s.qk_clip.gamma.size();
    q["smallest_gamma"] = s.qk_clip.smallest_gamma();
    d["qk_clip"] = q;
  } else {
    d["qk_clip"] = py::none();
  }
  py::list adapters;
  for (const AdapterRecord& a : s.adapters) adapters.append(to_python(adapter_json(a)));
  d["adapters"] = adapters;
  return d;
}

}  // namespace
}  // namespace kiln::python

PYBIND11_MODULE(kiln, m) {
  using namespace kiln;
  using namespace kiln::python;
  m.doc() = "kiln: export MaxText checkpoints and run them on the CPU (docs/regression-testing.md)";
  m.attr("__version__") = KILN_VERSION;

  // kiln::Error and its subclasses (StateError, NonFiniteError) → kiln.Error(message).
  py::register_exception<Error>(m, "Error");

  m.def("export", &export_artifact_py, py::arg("checkpoint"), py::arg("config"), py::arg("out"),
        py::kw_only(), py::arg("set") = std::vector<std::string>{},
        py::arg("scan_axis") = py::none(), py::arg("max_logits") = std::vector<std::string>{},
        py::arg("qk_clip_threshold") = py::none(), py::arg("qk_clip_per_group") = false,
        py::arg("qk_clip_mode") = py::none(), py::arg("qk_clip_calibrate") = py::none(),
        py::arg("lora") = std::vector<std::string>{},
        py::arg("lora_name") = std::vector<std::string>{}, py::arg("lora_scale") = py::none(),
        py::arg("merge_lora") = false, py::arg("tokenizer") = py::none(), py::arg("force") = false,
        py::arg("weights_layout") = py::none(),
        "Exports a MaxText checkpoint (kiln export); returns the summary as a dict.");

  m.def(
      "inspect",
      [](const std::string& path, bool verify) {
        nlohmann::ordered_json j;
        {
          py::gil_scoped_release nogil;
          const auto art = Artifact::open(path, {.verify_checksums = verify});
          j = inspect_artifact(*art);
        }
        return to_python(j);
      },
      py::arg("path"), py::arg("verify") = true,
      "The artifact as `kiln inspect --json` describes it; checks every checksum unless "
      "verify=False.");

  py::class_<Tokenizer>(m, "Tokenizer")
      .def(
          "encode", [](const Tokenizer& t, const std::string& text) { return t.encode(text); },
          py::arg("text"), "Plain pieces of `text` (no bos/eos added).")
      .def(
          "decode",
          [](const Tokenizer& t, const std::vector<int32_t>& ids) { return t.decode(ids); },
          py::arg("ids"))
      .def_property_readonly("vocab_size", &Tokenizer::vocab_size)
      .def_property_readonly("bos_id", &Tokenizer::bos_id)
      .def_property_readonly("eos_id", &Tokenizer::eos_id);

  py::class_<PyPrefix>(m, "Prefix")
      .def_property_readonly("tokens", [](PyPrefix& p) { return p.get().tokens; })
      .def_property_readonly("logprobs", [](PyPrefix& p) { return p.get().token_logp; })
      .def_property_readonly("next_pos", [](PyPrefix& p) { return p.get().next_pos; })
      .def_property_readonly(
          "logits",
          [](py::object self) {
            std::vector<float>& l = self.cast<PyPrefix&>().get().logits;
            return py::array_t<float>({int64_t(l.size())}, {int64_t(sizeof(float))}, l.data(),
                                      self);
          },
          "f32 logits at the prompt's last position (a view, valid while the prefix lives)");

  py::class_<TextGeneration>(m, "TextGeneration")
      .def("__iter__", [](TextGeneration& g) -> TextGeneration& { return g; })
      .def("__next__", &TextGeneration::next);

  py::class_<PyEngine>(m, "Engine")
      .def(py::init<const std::string&, int64_t, std::optional<int>, int64_t, bool, bool, bool>(),
           py::arg("path"), py::arg("slots") = 1, py::arg("threads") = py::none(),
           py::arg("max_seq_len") = 0, py::arg("relayout") = true, py::arg("verify") = true,
           py::arg("adapt_threads") = true)
      .def_property_readonly("vocab_size",
                             [](PyEngine& e) { return e.engine().config().vocab_size; })
      .def_property_readonly("max_seq_len", [](PyEngine& e) { return e.engine().max_seq_len(); })
      .def_property_readonly("slots", [](PyEngine& e) { return e.engine().slots(); })
      .def_property_readonly("decode_threads",
                             [](PyEngine& e) { return e.engine().model().decode_threads(); })
      .def_property_readonly(
          "tokenizer", [](PyEngine& e) { return e.engine().tokenizer(); },
          py::return_value_policy::reference_internal)
      .def("logits", &PyEngine::logits, py::arg("tokens"), py::arg("adapter") = py::none(),
           "[len(tokens), vocab] float32 logits of a fresh prefill (= kiln golden dump)")
      .def(
          "prefill",
          [](PyEngine& e, const std::vector<int32_t>& tokens,
             const std::optional<std::string>& adapter, const std::optional<std::string>& sampling,
             std::optional<float> temperature, int32_t top_k, float top_p, uint64_t seed,
             const std::vector<int32_t>& stop, int64_t max_tokens) {
            return e.prefill(
                tokens, 1,
                sampling_params(sampling, temperature, top_k, top_p, seed, stop, max_tokens),
                adapter.value_or(""));
          },
          py::arg("tokens"), py::kw_only(), py::arg("adapter") = py::none(), KILN_SAMPLING_ARGS)
      .def(
          "prefill_multisampling",
          [](PyEngine& e, const std::vector<int32_t>& tokens, int64_t n,
             const std::optional<std::string>& adapter, const std::optional<std::string>& sampling,
             std::optional<float> temperature, int32_t top_k, float top_p, uint64_t seed,
             const std::vector<int32_t>& stop, int64_t max_tokens) {
            return e.prefill(
                tokens, n,
                sampling_params(sampling, temperature, top_k, top_p, seed, stop, max_tokens),
                adapter.value_or(""));
          },
          py::arg("tokens"), py::arg("n"), py::kw_only(), py::arg("adapter") = py::none(),
          KILN_SAMPLING_ARGS)
      .def(
          "prefill_concat",
          [](PyEngine& e, const std::vector<std::vector<int32_t>>& prompts,
             const std::optional<std::vector<std::string>>& adapters,
             const std::optional<std::string>& sampling, std::optional<float> temperature,
             int32_t top_k, float top_p, uint64_t seed, const std::vector<int32_t>& stop,
             int64_t max_tokens) {
            return e.prefill_concat(
                prompts, adapters,
                sampling_params(sampling, temperature, top_k, top_p, seed, stop, max_tokens));
          },
          py::arg("prompts"), py::kw_only(), py::arg("adapters") = py::none(), KILN_SAMPLING_ARGS)
      .def("insert", &PyEngine::insert, py::arg("prefix"), py::arg("slot"))
      .def("bulk_insert", &PyEngine::bulk_insert, py::arg("prefix"), py::arg("slots"))
      .def("generate", &PyEngine::generate,
           "One token for every active slot, one batched pass: a list of dicts (slot, token, "
           "logp, finish)")
      .def(
          "release", [](PyEngine& e, int64_t slot) { e.engine().release(slot); }, py::arg("slot"))
      .def(
          "load_adapter",
          [](PyEngine& e, const std::string& name) {
            py::gil_scoped_release nogil;
            e.engine().load_adapter(name);
          },
          py::arg("name"))
      .def(
          "unload_adapter",
          [](PyEngine& e, const std::string& name) { e.engine().unload_adapter(name); },
          py::arg("name"))
      .def_property_readonly("loaded_adapters",
                             [](PyEngine& e) { return e.engine().loaded_adapters(); })
      .def(
          "generate_text",
          [](py::object self, const std::string& prompt, int64_t max_tokens,
             const std::optional<std::string>& sampling, std::optional<float> temperature,
             int32_t top_k, float top_p, uint64_t seed, const std::vector<int32_t>& stop) {
            PyEngine& e = self.cast<PyEngine&>();
            return std::make_unique<TextGeneration>(
                e, self, prompt,
                sampling_params(sampling, temperature, top_k, top_p, seed, stop, max_tokens));
          },
          py::arg("prompt"), py::arg("max_tokens") = 32, py::kw_only(),
          py::arg("sampling") = py::none(), py::arg("temperature") = py::none(),
          py::arg("top_k") = 0, py::arg("top_p") = 1.0f, py::arg("seed") = 0,
          py::arg("stop") = std::vector<int32_t>{},
          "Streams the continuation of a text prompt ([bos] + its pieces) as text pieces; ends at "
          "eos (unless stop is given), max_tokens or the context.");
}
