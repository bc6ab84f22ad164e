//! Everything text-side of a model: tokenizer, chat template, end-of-sequence ids. Built from an
//! HF directory (tokenizer.json, tokenizer_config.json, chat_template.jinja,
//! generation_config.json) or from a GGUF file's metadata, the way transformers' GGUF loader
//! builds them (`integrations/ggml.py`, GGUFGPTConverter).

use std::path::Path;

use llm_formats::{GgufFile, ModelSource};
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use crate::error::{Result, ServerError};
use crate::template::ChatTemplate;

pub struct TextModel {
    /// None for a directory without tokenizer.json (test models): such a model takes
    /// `prompt_ids` only and streams token ids with empty text.
    pub tokenizer: Option<Tokenizer>,
    pub chat_template: Option<ChatTemplate>,
    /// Generation stops at any of these.
    pub eos_ids: Vec<u32>,
}

impl std::fmt::Debug for TextModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextModel")
            .field("eos_ids", &self.eos_ids)
            .finish_non_exhaustive()
    }
}

fn files_error(path: &Path, msg: impl std::fmt::Display) -> ServerError {
    ServerError::ModelFiles {
        code: llm_abi::ErrorCode::InvalidArgument,
        message: format!("{}: {msg}", path.display()),
    }
}

/// A token given in tokenizer_config.json as a string or as an AddedToken dict.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

/// `eos_token_id` as an int or a list of ints.
fn id_list(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => vec![],
    }
}

impl TextModel {
    pub fn from_source(source: &ModelSource) -> Result<TextModel> {
        match source {
            ModelSource::HfDir {
                dir,
                config,
                generation_config,
                ..
            } => Self::from_hf_dir(dir, config, generation_config.as_ref()),
            ModelSource::Gguf { file, .. } => Self::from_gguf(file),
        }
    }

    pub(crate) fn from_hf_dir(
        dir: &Path,
        config: &Value,
        generation_config: Option<&Value>,
    ) -> Result<TextModel> {
        let tc_path = dir.join("tokenizer_config.json");
        let tc = llm_formats::read_json_opt(&tc_path)?.unwrap_or(Value::Null);
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = match llm_formats::read_json_opt(&tok_path)? {
            Some(mut json) => {
                non_legacy_sentencepiece(&mut json, &tc);
                Some(
                    Tokenizer::from_bytes(json.to_string().as_bytes())
                        .map_err(|e| files_error(&tok_path, e))?,
                )
            }
            None => {
                tracing::warn!(dir = %dir.display(), "no tokenizer.json: the model accepts prompt_ids only");
                None
            }
        };
        let bos = token_text(tc.get("bos_token"));
        let eos = token_text(tc.get("eos_token"));
        // transformers >= 4.43 saves the template to chat_template.jinja; older configs inline it
        // (a string, or a list of named templates of which "default" is used).
        let jinja_path = dir.join("chat_template.jinja");
        let source = if jinja_path.exists() {
            Some(std::fs::read_to_string(&jinja_path).map_err(|e| files_error(&jinja_path, e))?)
        } else {
            match tc.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template").and_then(Value::as_str))
                    .map(str::to_owned),
                _ => None,
            }
        };
        let chat_template = source
            .map(|s| ChatTemplate::new(&s, bos.clone(), eos.clone()))
            .transpose()
            .map_err(|e| files_error(&tc_path, e))?;
        // HF generate stops at generation_config.eos_token_id, which defaults to the model
        // config's; the tokenizer's eos_token is the last resort.
        let mut eos_ids = id_list(generation_config.and_then(|g| g.get("eos_token_id")));
        if eos_ids.is_empty() {
            eos_ids = id_list(config.get("eos_token_id"));
        }
        if eos_ids.is_empty() {
            if let (Some(t), Some(e)) = (&tokenizer, eos.as_deref()) {
                eos_ids.extend(t.token_to_id(e));
            }
        }
        Ok(TextModel {
            tokenizer,
            chat_template,
            eos_ids,
        })
    }

    fn from_gguf(file: &GgufFile) -> Result<TextModel> {
        let path = file.path();
        let model = file.meta_str("tokenizer.ggml.model")?;
        let tokens = file.meta_strings("tokenizer.ggml.tokens")?;
        let types = file
            .meta_ints("tokenizer.ggml.token_type")
            .unwrap_or_default();
        let tokenizer_json = match model {
            "gpt2" => {
                let merges = file.meta_strings("tokenizer.ggml.merges")?;
                gpt2_tokenizer_json(&tokens, &types, &merges)
            }
            other => {
                return Err(ServerError::ModelFiles {
                    code: llm_abi::ErrorCode::Unimplemented,
                    message: format!(
                        "{}: GGUF tokenizer model `{other}` is not supported (gpt2 is)",
                        path.display()
                    ),
                })
            }
        };
        let tokenizer = Some(
            Tokenizer::from_bytes(tokenizer_json.to_string().as_bytes()).map_err(|e| {
                files_error(path, format!("building the tokenizer from metadata: {e}"))
            })?,
        );
        let text_of = |key: &str| -> Option<String> {
            let id = file.meta_u64(key).ok()? as usize;
            tokens.get(id).map(|s| s.to_string())
        };
        let chat_template = match file.meta_str("tokenizer.chat_template") {
            Ok(src) => Some(
                ChatTemplate::new(
                    src,
                    text_of("tokenizer.ggml.bos_token_id"),
                    text_of("tokenizer.ggml.eos_token_id"),
                )
                .map_err(|e| files_error(path, e))?,
            ),
            Err(_) => None,
        };
        // llama.cpp's end-of-generation set: the declared eos/eot ids plus the control tokens
        // chat formats end a turn with (llama-vocab.cpp), since many GGUFs declare only one.
        const EOG_TEXTS: &[&str] = &[
            "<|eot_id|>",
            "<|im_end|>",
            "<|end|>",
            "<end_of_turn>",
            "<|endoftext|>",
            "<|end_of_text|>",
            "<EOT>",
            "<｜end▁of▁sentence｜>",
        ];
        let mut eos_ids: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
            .iter()
            .filter_map(|k| file.meta_u64(k).ok().map(|v| v as u32))
            .collect();
        for (id, t) in tokens.iter().enumerate() {
            let control = types.get(id).is_none_or(|&ty| ty == 3);
            if control && EOG_TEXTS.contains(t) {
                eos_ids.push(id as u32);
            }
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Ok(TextModel {
            tokenizer,
            chat_template,
            eos_ids,
        })
    }

    /// Token ids of raw text, as HF `tokenizer(text)` (special tokens added per the tokenizer's
    /// post-processor).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let t = self.tokenizer.as_ref().ok_or_else(|| {
            ServerError::invalid(
                "input",
                "this model has no tokenizer (no tokenizer.json): send prompt_ids",
            )
        })?;
        t.encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ServerError::Internal(format!("tokenizer: {e}")))
    }

    /// Empty text for a model without tokenizer.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        self.tokenizer
            .as_ref()
            .and_then(|t| t.decode(ids, skip_special_tokens).ok())
            .unwrap_or_default()
    }
}

/// transformers builds Llama-family SentencePiece tokenizers with `legacy: false` (Phi-3, Llama 2
/// chat fine-tunes) with a `Metaspace(prepend_scheme="first")` pre-tokenizer instead of the legacy
/// `Prepend("▁")` normalizer stored in many tokenizer.json files: text right after a special token
/// gets no "▁" prefix (`<|user|>\nTell` -> `T`,`ell`, not `▁Tell`). Do the same, so ids match.
fn non_legacy_sentencepiece(tokenizer: &mut Value, tokenizer_config: &Value) {
    if tokenizer_config.get("legacy").and_then(Value::as_bool) != Some(false) {
        return;
    }
    let legacy_normalizer = json!({"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u{2581}"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}
    ]});
    if tokenizer.get("normalizer") == Some(&legacy_normalizer)
        && tokenizer.get("pre_tokenizer").is_none_or(Value::is_null)
    {
        tokenizer["normalizer"] = Value::Null;
        tokenizer["pre_tokenizer"] = json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false});
    }
}

/// tokenizer.json of a byte-level BPE built from GGUF metadata, as transformers'
/// GGUFGPTConverter builds it: ByteLevel pre-tokenizer (GPT-2 split regex) and decoder, control
/// tokens (type 3) and user-defined tokens (type 4) as added tokens.
fn gpt2_tokenizer_json(tokens: &[&str], types: &[i64], merges: &[&str]) -> Value {
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();
    let added: Vec<Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types[i] == 3})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        }
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::template::Message;

    fn repo() -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    /// The default model (fetched by the repo script on first use), its text side.
    pub(crate) fn smollm2() -> TextModel {
        let script = repo().join("scripts/fetch-default-model.sh");
        let out = std::process::Command::new(&script)
            .output()
            .expect("fetch script");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = std::path::PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        TextModel::from_source(&ModelSource::open(&path).unwrap()).unwrap()
    }

    pub(crate) fn reference() -> Value {
        serde_json::from_slice(
            &std::fs::read(repo().join("tests/fixtures/smollm2/reference.json")).unwrap(),
        )
        .unwrap()
    }

    fn ids(v: &Value) -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    }

    #[test]
    fn gguf_tokenizer_and_template_match_transformers() {
        let text = smollm2();
        let r = reference();
        for case in r["tokenizer_cases"].as_array().unwrap() {
            let s = case["text"].as_str().unwrap();
            assert_eq!(
                text.encode(s, true).unwrap(),
                ids(&case["ids"]),
                "tokenizing {s:?}"
            );
        }
        let messages = [
            Message {
                role: "system".into(),
                content: "You are a helpful assistant".into(),
            },
            Message {
                role: "user".into(),
                content: "Tell a light-hearted joke for a room of Data Scientists".into(),
            },
        ];
        let rendered = text
            .chat_template
            .as_ref()
            .unwrap()
            .render(&messages, true)
            .unwrap();
        assert_eq!(rendered, r["prompt_text"].as_str().unwrap());
        assert_eq!(
            text.encode(&rendered, false).unwrap(),
            ids(&r["prompt_ids"])
        );
        // HF stops the reference generation at id 2 (<|im_end|>).
        assert!(text
            .eos_ids
            .contains(&(r["eos_token_id"].as_u64().unwrap() as u32)));
    }

    #[test]
    fn hf_tokenizer_fixture_agrees_with_gguf_built_one() {
        // tests/fixtures/smollm2/hf_tokenizer is what transformers built from the same GGUF.
        let hf =
            Tokenizer::from_file(repo().join("tests/fixtures/smollm2/hf_tokenizer/tokenizer.json"))
                .unwrap();
        let ours = smollm2();
        for case in reference()["tokenizer_cases"].as_array().unwrap() {
            let s = case["text"].as_str().unwrap();
            assert_eq!(
                hf.encode(s, true).unwrap().get_ids(),
                ours.encode(s, true).unwrap().as_slice()
            );
        }
    }

    /// A family's tokenizer directory from tests/fixtures/tokenizers, with tokenizer.json
    /// decompressed (it is committed xz-compressed) into a temp directory.
    fn family(name: &str) -> TextModel {
        let src = repo().join("tests/fixtures/tokenizers").join(name);
        let dir = std::env::temp_dir()
            .join(format!("llm-tokenizers-{}", std::process::id()))
            .join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            src.join("tokenizer_config.json"),
            dir.join("tokenizer_config.json"),
        )
        .unwrap();
        let out = std::process::Command::new("python3")
            .args(["-c", "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))"])
            .arg(src.join("tokenizer.json.xz"))
            .arg(dir.join("tokenizer.json"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = TextModel::from_hf_dir(&dir, &json!({}), None).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        text
    }

    fn msgs(pairs: &[(&str, &str)]) -> Vec<Message> {
        pairs
            .iter()
            .map(|(r, c)| Message {
                role: r.to_string(),
                content: c.to_string(),
            })
            .collect()
    }

    /// HF `apply_chat_template(..., add_generation_prompt=True)` text and ids for the five
    /// families (tests/fixtures/tokenizers/chat_template_reference.json).
    #[test]
    fn five_families_render_and_tokenize_like_transformers() {
        let all: Value = serde_json::from_slice(
            &std::fs::read(repo().join("tests/fixtures/tokenizers/chat_template_reference.json"))
                .unwrap(),
        )
        .unwrap();
        let (sys, user) = (
            "You are a helpful assistant",
            "Tell a light-hearted joke for a room of Data Scientists",
        );
        let conversations = [
            ("seed_messages", msgs(&[("system", sys), ("user", user)])),
            ("user_only", msgs(&[("user", user)])),
            (
                "multi_turn",
                msgs(&[
                    ("user", "Hi!"),
                    ("assistant", "Hello! How can I help?"),
                    ("user", "Write a haiku about GPUs."),
                ]),
            ),
        ];
        for (fam, cases) in all.as_object().unwrap() {
            let text = family(fam);
            let template = text.chat_template.as_ref().expect("template");
            for (name, messages) in &conversations {
                let want = &cases[*name];
                match template.render(messages, true) {
                    Ok(rendered) => {
                        let expected = want["text"]
                            .as_str()
                            .unwrap_or_else(|| panic!("{fam}/{name}: HF raised {}", want["error"]));
                        assert_eq!(rendered, expected, "{fam}/{name}");
                        assert_eq!(
                            text.encode(&rendered, false).unwrap(),
                            ids(&want["ids"]),
                            "{fam}/{name} ids"
                        );
                    }
                    Err(e) => {
                        let hf = want["error"]
                            .as_str()
                            .unwrap_or_else(|| panic!("{fam}/{name}: we raised {e}, HF did not"));
                        // HF's message is "TemplateError: <the template's own text>".
                        let own = hf.trim_start_matches("TemplateError: ");
                        assert_eq!(
                            e.to_string(),
                            format!("chat template: {own}"),
                            "{fam}/{name}"
                        );
                    }
                }
            }
            if cases["seed_messages"].get("error").is_some() {
                // Folding the system prompt into the user turn makes the seed's chat render.
                let mut folded = conversations[0].1.clone();
                crate::request::fold_system_prompt(&mut folded);
                let r = template.render(&folded, true).unwrap();
                assert!(r.contains(&format!("{sys}\n\n{user}")), "{fam}: {r:?}");
            }
        }
    }
}
