// Run-time LoRA adapters inside an artifact (issue 4): per-layer adapter blobs under
// adapters/<name>/, recorded in the manifest. Written by `kiln export --lora DIR --lora-name NAME`
// and by `kiln adapter add` for an existing artifact, which never touches the base blobs.
#pragma once

#include <string>

#include "export/lora.h"
#include "schema/manifest.h"

namespace kiln {

// Writes the adapter's blobs (bf16 "<tensor>.lora_a" [in, r] and "<tensor>.lora_b" [r, out], one
// blob per adapted layer) into `dir` (created; normally a temporary directory the caller renames
// to <artifact>/adapters/<name>) and returns the manifest record, blob paths relative to the
// artifact directory. When the base was exported with QK-Clip (`qk_clip.applied`), B of every
// clipped tensor gets the same per-head column scales (apply_qk_clip_to_lora_b), so base + adapter
// at run time equals the clip of the merged weights. Checks for Ctrl-C between tensors.
AdapterRecord write_adapter_blobs(const AdapterSource& src, const ModelConfig& base,
                                  const QkClipRecord& qk_clip, const std::string& name,
                                  const std::string& dir);

// The record of an adapter folded into the base weights at export (provenance only, no blobs).
AdapterRecord merged_adapter_record(const AdapterSource& src);

struct AddAdapterOptions {
  std::string artifact;
  std::string adapter_dir;
  std::string name;
  double lora_scale = 1;
  bool force = false;           // replace an adapter of the same name
  bool verify_checksum = true;  // false: accept a manifest without (or failing) its checksum
};

// `kiln adapter add`: reads the manifest, checks the adapter against the artifact's config, writes
// adapters/<name>/ and then the updated manifest. On any error the artifact is left as it was.
// Crash consistency: the blobs are staged in a locked temporary directory and fsync'd; the change
// is committed by writing the complete new manifest durably beside the current one (a journal,
// `.manifest.kfb.kiln-next-PID`); then the directory is moved (replaced with RENAME_EXCHANGE,
// the manifest meanwhile listing no adapter of that name) and the journal renamed over
// manifest.kfb. The artifact is loadable at every moment; the next `kiln adapter` command finishes
// a committed change a kill interrupted, and removes the leftovers of an uncommitted one and
// adapter directories the manifest does not list (one stderr line each). The artifact directory
// is flock'ed for the duration, so two adapter commands never interleave.
AdapterRecord add_adapter(const AddAdapterOptions& opt);

// `kiln adapter remove`: drops the record from the manifest (atomically), then deletes
// adapters/<name>/ (moved aside first, so a kill leaves either the whole directory, which the next
// adapter command removes, or none of it).
void remove_adapter(const std::string& artifact, const std::string& name, bool verify_checksum);

// Replaces <artifact>/manifest.kfb atomically and durably (common/durable_output.h).
void write_manifest(const std::string& artifact, const Manifest& m);

}  // namespace kiln
