//! Incremental detokenization with HF `TextStreamer`'s release points.
//!
//! Two layers:
//! 1. New text per token, TGI's `decode_token` way: decode a short window `ids[prefix..]` and
//!    subtract the decode of `ids[prefix..read]`. Decoding in a window keeps it O(1) per token,
//!    and a window that still ends in an incomplete UTF-8 sequence (U+FFFD) waits for the next
//!    token, so half a character is never released. The deltas concatenate to the decode of
//!    all ids.
//! 2. Release as TextStreamer does (`transformers/generation/streamers.py`): everything when
//!    the text ends with a newline or a CJK character, otherwise up to the last space. Text that
//!    could be the beginning of a stop string is also held back until it is known not to be one.

use crate::tokenizer::TextModel;

pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
    /// Decoded but not yet released.
    pending: String,
    stop: Vec<String>,
}

/// What one token produced.
#[derive(Debug, PartialEq, Eq)]
pub struct Released {
    pub text: String,
    /// A stop string was found: `text` ends right before it and the generation is over.
    pub stopped: bool,
}

/// HF `TextStreamer._is_chinese_char`: the CJK Unified Ideographs blocks.
fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

impl StreamDecoder {
    pub fn new(stop: Vec<String>) -> Self {
        StreamDecoder {
            ids: Vec::new(),
            prefix: 0,
            read: 0,
            pending: String::new(),
            stop,
        }
    }

    /// Feed one generated token.
    pub fn push(&mut self, text: &TextModel, id: u32) -> Released {
        self.ids.push(id);
        let before = text.decode(&self.ids[self.prefix..self.read], true);
        let now = text.decode(&self.ids[self.prefix..], true);
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.starts_with(&before) {
            self.pending.push_str(&now[before.len()..]);
            self.prefix = self.read;
            self.read = self.ids.len();
        } else if !now.starts_with(&before) {
            // A decoder that rewrites earlier text (rare): fall back to the whole-sequence decode.
            let all_before = text.decode(&self.ids[..self.read], true);
            let all_now = text.decode(&self.ids, true);
            if !all_now.ends_with('\u{FFFD}') {
                let common = all_before
                    .char_indices()
                    .zip(all_now.chars())
                    .take_while(|((_, a), b)| a == b)
                    .last()
                    .map_or(0, |((i, a), _)| i + a.len_utf8());
                self.pending.push_str(&all_now[common..]);
                self.prefix = self.read;
                self.read = self.ids.len();
            }
        }
        self.release()
    }

    fn release(&mut self) -> Released {
        // A complete stop string ends the generation; its text is not returned.
        if let Some(at) = self
            .stop
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let text = self.pending[..at].to_string();
            self.pending.clear();
            return Released { text, stopped: true };
        }
        let cut = match self.pending.chars().last() {
            None => 0,
            Some('\n') => self.pending.len(),
            Some(c) if is_cjk(c) => self.pending.len(),
            Some(_) => self.pending.rfind(' ').map_or(0, |i| i + 1),
        };
        // Hold back the earliest suffix that could still become a stop string.
        let hold = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.pending[i..];
                self.stop.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.pending.len());
        let cut = cut.min(hold);
        let text: String = self.pending.drain(..cut).collect();
        Released { text, stopped: false }
    }

    /// The end of the generation: release whatever is left (TextStreamer.end()), including the
    /// decode of trailing ids that never completed a character.
    pub fn finish(&mut self, text: &TextModel) -> String {
        if self.read < self.ids.len() {
            let before = text.decode(&self.ids[self.prefix..self.read], true);
            let now = text.decode(&self.ids[self.prefix..], true);
            if let Some(rest) = now.strip_prefix(before.as_str()) {
                self.pending.push_str(rest);
            }
            self.read = self.ids.len();
        }
        std::mem::take(&mut self.pending)
    }
}
