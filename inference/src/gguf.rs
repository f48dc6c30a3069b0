//! Reading a llama-family GGUF file: checked metadata, optional re-quantization at load, and
//! the tokenizer and chat template the file carries.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;

use candle_core::Device;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use serde::{Deserialize, Serialize};
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};

/// What the generator does with the file's quantized weights at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quantization {
    /// As stored for the native engine (its 4-bit kernels read Q4_1 directly); Q8_0 for
    /// candle's engine. The default.
    #[default]
    Auto,
    /// Use the weights as stored.
    AsStored,
    /// Re-quantize Q4_1 tensors to Q8_0 (candle's Q4_1 CPU kernel is slow; Q8_0 is faster
    /// there).
    Q8_0,
    /// Re-quantize Q4_1 tensors to Q4_0 (smallest, fast, a little less accurate).
    Q4_0,
}

impl Quantization {
    fn target(self) -> Option<GgmlDType> {
        match self {
            Quantization::Auto | Quantization::AsStored => None,
            Quantization::Q8_0 => Some(GgmlDType::Q8_0),
            Quantization::Q4_0 => Some(GgmlDType::Q4_0),
        }
    }
}

/// The checked content of a GGUF file, re-quantized as asked, in memory.
pub(crate) struct Loaded {
    pub(crate) content: gguf_file::Content,
    pub(crate) bytes: Cursor<Vec<u8>>,
    pub(crate) context_length: usize,
    pub(crate) requantized: usize,
}

fn md<'a>(ct: &'a gguf_file::Content, key: &str, path: &Path) -> Result<&'a gguf_file::Value> {
    ct.metadata
        .get(key)
        .ok_or_else(|| Error::model(path, format!("metadata key `{key}` is missing")))
}

/// Reads and checks `path`, re-quantizing its Q4_1 tensors to `quant`'s target. The file is
/// read once; without re-quantization its bytes are what the engines read their tensors
/// from.
pub(crate) fn load(path: &Path, quant: Quantization) -> Result<Loaded> {
    let bytes = std::fs::read(path).map_err(|e| Error::model(path, e))?;
    crate::gguf_check::check_header(&bytes).map_err(|e| Error::model(path, e))?;
    let mut file = Cursor::new(bytes);
    // The header was checked; a panic in the reader would still be an error, not a crash.
    let ct = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        gguf_file::Content::read(&mut file)
    }))
    .map_err(|_| Error::model(path, "the GGUF reader failed on this file"))?
    .map_err(|e| Error::model(path, format!("not a GGUF model file: {e}")))?;
    let arch = md(&ct, "general.architecture", path)?
        .to_string()
        .map_err(|e| Error::model(path, e))?
        .clone();
    if arch != "llama" {
        return Err(Error::model(
            path,
            format!("architecture `{arch}` is not supported (llama-family GGUF only)"),
        ));
    }
    for key in [
        "llama.block_count",
        "llama.embedding_length",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.rope.dimension_count",
        "llama.attention.layer_norm_rms_epsilon",
    ] {
        md(&ct, key, path)?;
    }
    // The block count sizes allocations in candle's loader: the tensors must back it.
    let blocks = md(&ct, "llama.block_count", path)?
        .to_u32()
        .map_err(|e| Error::model(path, e))?;
    let last = format!("blk.{}.attn_q.weight", blocks.saturating_sub(1));
    if blocks == 0
        || blocks as usize > ct.tensor_infos.len()
        || !ct.tensor_infos.contains_key(&last)
    {
        return Err(Error::model(
            path,
            format!("llama.block_count says {blocks} blocks but tensor `{last}` is missing"),
        ));
    }
    if let Some(experts) = ct.metadata.get("llama.expert_count")
        && experts.to_u32().map_or(true, |n| n > 256)
    {
        return Err(Error::model(
            path,
            "llama.expert_count is not a count up to 256",
        ));
    }
    if !ct.tensor_infos.contains_key("token_embd.weight") {
        return Err(Error::model(path, "tensor `token_embd.weight` is missing"));
    }
    for key in ["llama.rope.scaling.type", "llama.rope.scaling.factor"] {
        if let Some(v) = ct.metadata.get(key) {
            let neutral = match key {
                "llama.rope.scaling.type" => v.to_string().is_ok_and(|s| s == "none"),
                _ => v.to_f32().is_ok_and(|f| f == 1.0),
            };
            if !neutral {
                return Err(Error::model(
                    path,
                    format!(
                        "`{key}` = {v:?}: rope scaling is not supported (the output would be wrong)"
                    ),
                ));
            }
        }
    }
    let context_length = ct
        .metadata
        .get("llama.context_length")
        .and_then(|v| v.to_u32().ok())
        .map_or(2048, |v| v as usize);
    let Some(target) = quant.target() else {
        // As stored: every tensor's data must lie within the file (what reading it checks).
        let len = file.get_ref().len() as u64;
        for (name, info) in &ct.tensor_infos {
            let (elems, block) = (info.shape.elem_count(), info.ggml_dtype.block_size());
            let bytes = (elems / block * info.ggml_dtype.type_size()) as u64;
            let start = ct.tensor_data_offset.saturating_add(info.offset);
            if !elems.is_multiple_of(block) || start.saturating_add(bytes) > len {
                return Err(Error::model(
                    path,
                    format!(
                        "tensor `{name}`: its {bytes} bytes at offset {start} are not in the file"
                    ),
                ));
            }
        }
        return Ok(Loaded {
            content: ct,
            bytes: file,
            context_length,
            requantized: 0,
        });
    };
    let cpu = Device::Cpu;
    let mut names: Vec<String> = ct.tensor_infos.keys().cloned().collect();
    names.sort();
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    let mut requantized = 0;
    for name in &names {
        let t = ct
            .tensor(&mut file, name, &cpu)
            .map_err(|e| Error::model(path, format!("tensor `{name}`: {e}")))?;
        let t = match t.dtype() {
            GgmlDType::Q4_1 => {
                let f = t.dequantize(&cpu).map_err(Error::compute)?;
                requantized += 1;
                QTensor::quantize(&f, target)
                    .map_err(|e| Error::model(path, format!("re-quantizing `{name}`: {e}")))?
            }
            _ => t,
        };
        tensors.push((name.clone(), t));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> =
        ct.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut bytes = Cursor::new(Vec::new());
    gguf_file::write(&mut bytes, &metadata, &refs).map_err(Error::compute)?;
    bytes.set_position(0);
    let content = gguf_file::Content::read(&mut bytes).map_err(Error::compute)?;
    Ok(Loaded {
        content,
        bytes,
        context_length,
        requantized,
    })
}

/// The GPT-2 byte-level alphabet: byte -> the char standing for it in token strings.
fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        table[b as usize] = if printable {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
    }
    table
}

/// A generation tokenizer with the raw bytes of every token (for streaming text and for
/// constrained decoding) and the ids that end generation.
#[derive(Debug)]
pub(crate) struct TextTokenizer {
    pub(crate) inner: Tokenizer,
    /// The same tokenizer reading control-token text (`<|im_end|>`) as plain text: what the
    /// text of a chat message is tokenized with, so that a user cannot inject one.
    plain: Tokenizer,
    /// Bytes of each token; `None` for control tokens.
    pub(crate) bytes: Vec<Option<Vec<u8>>>,
    /// Control tokens (end of text, end of turn, ...): generating one ends the output.
    pub(crate) control: Vec<bool>,
    pub(crate) bos: Option<u32>,
    pub(crate) add_bos: bool,
    pub(crate) origin: String,
}

impl TextTokenizer {
    pub(crate) fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let body = self.encode_template(text)?;
        let mut ids = Vec::with_capacity(body.len() + 1);
        if self.add_bos
            && let Some(bos) = self.bos
        {
            ids.push(bos);
        }
        ids.extend(body);
        Ok(ids)
    }

    /// The ids of `text` with every control-token string in it read as plain text (no
    /// beginning-of-sequence token either).
    pub(crate) fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        self.ids(&self.plain, text)
    }

    /// The ids of template text (control-token strings are control tokens), with no
    /// beginning-of-sequence token.
    pub(crate) fn encode_template(&self, text: &str) -> Result<Vec<u32>> {
        self.ids(&self.inner, text)
    }

    fn ids(&self, tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
        let enc = tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer {
                origin: self.origin.clone(),
                detail: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    pub(crate) fn vocab_size(&self) -> usize {
        self.bytes.len()
    }

    /// From the GGUF's own `tokenizer.ggml.*` metadata (gpt2 byte-level BPE).
    pub(crate) fn from_gguf(ct: &gguf_file::Content, path: &Path) -> Result<Self> {
        let origin = format!("GGUF metadata of {}", path.display());
        let err = |detail: String| Error::Tokenizer {
            origin: origin.clone(),
            detail,
        };
        let get = |key: &str| {
            ct.metadata.get(key).ok_or_else(|| {
                err(format!(
                    "`{key}` is missing (pass a tokenizer.json instead)"
                ))
            })
        };
        let model = get("tokenizer.ggml.model")?
            .to_string()
            .map_err(|e| err(e.to_string()))?;
        if model != "gpt2" {
            return Err(err(format!(
                "tokenizer model `{model}` cannot be built from metadata (pass a tokenizer.json)"
            )));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            get(key)?
                .to_vec()
                .map_err(|e| err(format!("`{key}`: {e}")))?
                .iter()
                .map(|v| {
                    v.to_string()
                        .cloned()
                        .map_err(|e| err(format!("`{key}`: {e}")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<i32> = match ct.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| err(e.to_string()))?
                .iter()
                .map(|v| v.to_i32().map_err(|e| err(e.to_string())))
                .collect::<Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(err("token_type and tokens differ in length".into()));
        }
        let id = |key: &str| ct.metadata.get(key).and_then(|v| v.to_u32().ok());
        let eos = id("tokenizer.ggml.eos_token_id")
            .ok_or_else(|| err("`tokenizer.ggml.eos_token_id` is missing".into()))?;
        let bos = id("tokenizer.ggml.bos_token_id");
        let add_bos = ct
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| err(format!("merge `{m}` is not two tokens")))
            })
            .collect::<Result<_>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| err(e.to_string()))?;
        let mut inner = Tokenizer::new(bpe);
        let pre = ct
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_default();
        let byte_level = ByteLevel::new(false, true, true);
        if !matches!(
            pre.as_str(),
            "" | "default" | "gpt2" | "smollm" | "starcoder" | "refact"
        ) {
            return Err(err(format!(
                "pre-tokenizer `{pre}` is not supported (pass a tokenizer.json)"
            )));
        }
        if pre == "smollm" || pre == "starcoder" || pre == "refact" {
            inner.with_pre_tokenizer(Some(Sequence::new(vec![
                Digits::new(true).into(),
                byte_level.into(),
            ])));
        } else {
            inner.with_pre_tokenizer(Some(byte_level));
        }
        inner.with_decoder(Some(ByteLevel::default()));
        let control: Vec<bool> = types
            .iter()
            .enumerate()
            .map(|(i, &t)| t == 3 || i as u32 == eos)
            .collect();
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&control)
            .filter(|(_, c)| **c)
            .map(|(t, _)| AddedToken::from(t.clone(), true))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| err(e.to_string()))?;
        let table = byte_to_char();
        let inverse: HashMap<char, u8> = (0..=255u8).map(|b| (table[b as usize], b)).collect();
        let bytes = tokens
            .iter()
            .zip(&control)
            .map(|(t, &c)| {
                (!c).then(|| {
                    let mut out = Vec::with_capacity(t.len());
                    for ch in t.chars() {
                        match inverse.get(&ch) {
                            Some(&b) => out.push(b),
                            None => out.extend_from_slice(ch.to_string().as_bytes()),
                        }
                    }
                    out
                })
            })
            .collect();
        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);
        Ok(Self {
            inner,
            plain,
            bytes,
            control,
            bos,
            add_bos,
            origin,
        })
    }

    /// From a Hugging Face `tokenizer.json` (byte-level BPE expected); special tokens of the
    /// file are the control tokens; `eos` must be one of them.
    pub(crate) fn from_file(path: &Path, eos: u32) -> Result<Self> {
        let origin = path.display().to_string();
        let inner = Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            origin: origin.clone(),
            detail: e.to_string(),
        })?;
        let size = inner.get_vocab_size(true);
        let table = byte_to_char();
        let inverse: HashMap<char, u8> = (0..=255u8).map(|b| (table[b as usize], b)).collect();
        let specials: std::collections::HashSet<u32> = inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| *id)
            .collect();
        let mut bytes = Vec::with_capacity(size);
        let mut control = Vec::with_capacity(size);
        for id in 0..size as u32 {
            let special = specials.contains(&id) || id == eos;
            control.push(special);
            bytes.push(match inner.id_to_token(id) {
                Some(t) if !special => Some(
                    t.chars()
                        .flat_map(|ch| match inverse.get(&ch) {
                            Some(&b) => vec![b],
                            None => ch.to_string().into_bytes(),
                        })
                        .collect(),
                ),
                _ => None,
            });
        }
        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);
        Ok(Self {
            inner,
            plain,
            bytes,
            control,
            bos: None,
            add_bos: false,
            origin,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection() {
        let t = byte_to_char();
        let set: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(t[b' ' as usize], '\u{120}'); // 'Ġ'
        assert_eq!(t[b'\n' as usize], '\u{10A}'); // 'Ċ'
        assert_eq!(t[b'a' as usize], 'a');
    }
}
