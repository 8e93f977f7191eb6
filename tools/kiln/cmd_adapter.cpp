// `kiln adapter add|remove|list`: run-time LoRA adapters of an existing artifact. The base blobs
// are never rewritten; only adapters/<name>/ and the manifest change.
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "engine/inspect.h"
#include "export/adapter.h"
#include "tools/kiln/args.h"
#include "tools/kiln/commands.h"
#include "tools/kiln/common.h"

namespace kiln::cli {

namespace {

constexpr const char* kAdapterUsage =
    "usage: kiln adapter add ARTIFACT ADAPTER_DIR --name NAME [--lora-scale S] [--force]\n"
    "       kiln adapter remove ARTIFACT NAME\n"
    "       kiln adapter list ARTIFACT [--json]\n"
    "       (each also takes --no-verify: read a manifest without or failing its checksum)\n"
    "Adds, removes or lists the run-time LoRA adapters of an artifact (MaxText or PEFT adapter\n"
    "directories; the base weights are not rewritten).\n";

nlohmann::ordered_json adapters_json(const Manifest& m) {
  nlohmann::ordered_json list = nlohmann::ordered_json::array();
  for (const auto& a : m.adapters) list.push_back(adapter_json(a));
  return list;
}

}  // namespace

int cmd_adapter(int argc, const char* const* argv) {
  const std::string sub = argc >= 2 ? argv[1] : "";
  if (sub == "--help" || sub == "-h") {
    std::fputs(kAdapterUsage, stdout);
    return 0;
  }
  if (sub == "add") {
    ArgParser p("kiln adapter add",
                "Adds a run-time LoRA adapter (MaxText or PEFT directory) to an artifact.");
    p.positional("ARTIFACT", "artifact directory");
    p.positional("ADAPTER_DIR", "adapter directory (adapter_config.json + safetensors)");
    p.option("--name", "NAME", "adapter name (letters, digits, '-', '_', '.')", required);
    p.option("--lora-scale", "S", "multiplies the adapter's own scale (alpha/r)", "1");
    p.flag("--force", "replace an adapter of the same name");
    add_no_verify(p);
    Args a = p.parse(argc - 1, argv + 1);
    AddAdapterOptions opt{a.positional(0),  a.positional(1),
                          a.get("--name"),  a.get_double("--lora-scale", -1e6, 1e6),
                          a.has("--force"), !a.has("--no-verify")};
    const double t0 = now_seconds();
    AdapterRecord r = add_adapter(opt);
    std::printf("added adapter %s to %s: %s, rank %lld, %zu tensors, %.2f MiB in %.2f s\n",
                r.name.c_str(), opt.artifact.c_str(), r.format.c_str(),
                static_cast<long long>(r.rank), r.targets.size(), double(r.bytes()) / (1 << 20),
                now_seconds() - t0);
    return 0;
  }
  if (sub == "remove") {
    ArgParser p("kiln adapter remove", "Removes a run-time LoRA adapter from an artifact.");
    p.positional("ARTIFACT", "artifact directory");
    p.positional("NAME", "adapter name");
    add_no_verify(p);
    Args a = p.parse(argc - 1, argv + 1);
    remove_adapter(a.positional(0), a.positional(1), !a.has("--no-verify"));
    std::printf("removed adapter %s from %s\n", a.positional(1).c_str(), a.positional(0).c_str());
    return 0;
  }
  if (sub == "list") {
    ArgParser p("kiln adapter list", "Lists the LoRA adapters recorded in an artifact.");
    p.positional("ARTIFACT", "artifact directory");
    p.flag("--json", "print one JSON object");
    add_no_verify(p);
    Args a = p.parse(argc - 1, argv + 1);
    Manifest m = read_manifest_in(a.positional(0), !a.has("--no-verify"));
    if (a.has("--json")) {
      std::printf("%s\n", nlohmann::ordered_json{{"adapters", adapters_json(m)}}.dump().c_str());
    } else if (m.adapters.empty()) {
      std::printf("%s: no adapters\n", a.positional(0).c_str());
    } else {
      print_adapters(m);
    }
    return 0;
  }
  throw UsageError("kiln adapter: expected 'add', 'remove' or 'list' (see 'kiln adapter --help')");
}

}  // namespace kiln::cli
