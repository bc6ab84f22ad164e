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
    /// Window start: decoding from here on gives context to the tokens after `read`.
    prefix: usize,
    /// Tokens before `read` are fully moved into `pending` (or released).
    read: usize,
    /// Bytes of the text after `read` already moved to `pending` while the window still ended
    /// in an incomplete character.
    partial: usize,
    /// The decoded text currently ends in an incomplete UTF-8 sequence.
    incomplete: bool,
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
            partial: 0,
            incomplete: false,
            pending: String::new(),
            stop,
        }
    }

    /// Feed one generated token.
    pub fn push(&mut self, text: &TextModel, id: u32) -> Released {
        self.ids.push(id);
        self.absorb(text);
        self.release()
    }

    /// Move newly decoded text into `pending`.
    fn absorb(&mut self, text: &TextModel) {
        let before = text.decode(&self.ids[self.prefix..self.read], true);
        let now = text.decode(&self.ids[self.prefix..], true);
        let Some(new) = now.strip_prefix(before.as_str()) else {
            // A decoder that rewrote earlier text (not seen with byte-level BPE or metaspace):
            // restart the window at the current token.
            self.prefix = self.ids.len() - 1;
            self.read = self.prefix;
            self.partial = 0;
            self.incomplete = false;
            let t = text.decode(&self.ids[self.prefix..], true);
            self.pending.push_str(&t);
            self.prefix = self.read;
            self.read = self.ids.len();
            return;
        };
        let stable = new.trim_end_matches('\u{FFFD}');
        self.incomplete = stable.len() < new.len();
        if stable.len() > self.partial {
            self.pending.push_str(&stable[self.partial..]);
        }
        if self.incomplete {
            self.partial = self.partial.max(stable.len());
        } else {
            self.partial = 0;
            self.prefix = self.read;
            self.read = self.ids.len();
        }
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
            return Released {
                text,
                stopped: true,
            };
        }
        // TextStreamer looks at the last character of the decoded text, which is U+FFFD while a
        // character is incomplete.
        let last = if self.incomplete {
            Some('\u{FFFD}')
        } else {
            self.pending.chars().last()
        };
        let cut = match last {
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
        Released {
            text,
            stopped: false,
        }
    }

    /// The end of the generation: release whatever is left (TextStreamer.end()), including the
    /// decode of trailing ids that never completed a character.
    pub fn finish(&mut self, text: &TextModel) -> String {
        if self.incomplete {
            let before = text.decode(&self.ids[self.prefix..self.read], true);
            let now = text.decode(&self.ids[self.prefix..], true);
            if let Some(rest) = now.strip_prefix(before.as_str()) {
                self.pending.push_str(&rest[self.partial.min(rest.len())..]);
            }
            self.incomplete = false;
        }
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::tests::{reference, smollm2};

    /// HF `TextStreamer.put`/`end`, transcribed: decode the cache since the last newline, print
    /// up to the last space (everything at a newline or a CJK character).
    fn text_streamer(text: &TextModel, ids: &[u32]) -> Vec<String> {
        let (mut cache, mut print_len, mut out) = (Vec::new(), 0usize, Vec::new());
        for &id in ids {
            cache.push(id);
            let t = text.decode(&cache, true);
            let printable = if t.ends_with('\n') {
                let p = t[print_len..].to_string();
                cache.clear();
                print_len = 0;
                p
            } else if t.chars().last().is_some_and(is_cjk) {
                let p = t[print_len..].to_string();
                print_len += p.len();
                p
            } else {
                let end = t.rfind(' ').map_or(0, |i| i + 1);
                let p = if end > print_len {
                    t[print_len..end].to_string()
                } else {
                    String::new()
                };
                print_len += p.len();
                p
            };
            out.push(printable);
        }
        let t = text.decode(&cache, true);
        out.push(t[print_len..].to_string());
        out
    }

    fn ours(text: &TextModel, ids: &[u32], stop: Vec<String>) -> (Vec<String>, bool) {
        let mut d = StreamDecoder::new(stop);
        let mut out = Vec::new();
        for &id in ids {
            let r = d.push(text, id);
            out.push(r.text);
            if r.stopped {
                return (out, true);
            }
        }
        out.push(d.finish(text));
        (out, false)
    }

    #[test]
    fn chunks_equal_hf_text_streamer_and_concatenate_to_the_decode() {
        let text = smollm2();
        let r = reference();
        let mut cases: Vec<Vec<u32>> = vec![
            r["greedy_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect(),
            r["nf4_greedy_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect(),
        ];
        for case in r["tokenizer_cases"].as_array().unwrap() {
            cases.push(
                case["ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect(),
            );
        }
        for ids in cases {
            let (chunks, _) = ours(&text, &ids, vec![]);
            assert_eq!(chunks, text_streamer(&text, &ids), "ids {ids:?}");
            assert_eq!(chunks.concat(), text.decode(&ids, true));
            for c in &chunks {
                assert!(
                    !c.contains('\u{FFFD}'),
                    "half a character released: {chunks:?}"
                );
            }
        }
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        let text = smollm2();
        // "naïve café – 東京 🤖🎉": the emoji span several byte-level tokens.
        let ids = text.encode("naïve café – 東京 🤖🎉", false).unwrap();
        let mut d = StreamDecoder::new(vec![]);
        let mut all = String::new();
        for &id in &ids {
            let t = d.push(&text, id).text;
            assert!(!t.contains('\u{FFFD}'));
            all.push_str(&t);
        }
        all.push_str(&d.finish(&text));
        assert_eq!(all, "naïve café – 東京 🤖🎉");
    }

    #[test]
    fn stop_strings_cut_and_are_held_back() {
        let text = smollm2();
        let r = reference();
        let ids: Vec<u32> = r["greedy_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        // "What's a joke about a data scientist? A light-hearted joke ..."
        let (chunks, stopped) = ours(&text, &ids, vec!["? A light".into()]);
        assert!(stopped);
        assert_eq!(chunks.concat(), "What's a joke about a data scientist");
        // A stop string that never completes does not eat text.
        let (chunks, stopped) = ours(&text, &ids, vec!["scientist! no".into()]);
        assert!(!stopped);
        assert_eq!(chunks.concat(), r["greedy_text"].as_str().unwrap());
    }
}
