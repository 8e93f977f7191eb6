// What `kiln inspect --json` prints and the Python package's kiln.inspect() returns: an opened
// artifact described as one JSON object (config, blobs and tensors, tokenizer, QK-Clip, adapters,
// provenance). One function so that the two never drift apart.
#pragma once

#include <nlohmann/json.hpp>

#include "engine/artifact.h"

namespace kiln {

// Describes `art`. Opens the run-time adapters as the engine would (their checksums checked when
// the artifact's are) and parses the tokenizer, so a broken one shows here; throws kiln::Error
// naming the file when either is damaged.
nlohmann::ordered_json inspect_artifact(const Artifact& art);

// One adapter record as inspect and `kiln adapter list --json` show it.
nlohmann::ordered_json adapter_json(const AdapterRecord& a);

}  // namespace kiln
