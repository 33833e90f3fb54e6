//! Splitting generated text into reasoning, content and DSML tool calls, for the whole
//! text at once ([`parse_completion`]) and incrementally ([`CompletionStream`]).
//!
//! Rules (shared by both; the stream yields exactly what the whole-text parse returns):
//! 1. Everything from the first `<｜end▁of▁sentence｜>` on is ignored.
//! 2. Thinking mode: one leading `<think>` is skipped; reasoning is the text before the
//!    first `</think>` (DSML inside reasoning is never a call). Without `</think>` the
//!    whole text is reasoning and content is empty. Chat mode: no reasoning.
//! 3. Content runs up to the first `<｜DSML｜tool_calls>`; a `"\n\n"` right before it
//!    belongs to the block (`raw_dsml`), as in the official parser.
//! 4. The block runs through the first `</｜DSML｜tool_calls>`. If it parses, its calls
//!    are returned and any text after it is ignored; if it is malformed or never closed,
//!    the block and everything after it are plain content (never an error).

use serde_json::Value;

use crate::dsml::{self, BLOCK_END, BLOCK_START, ParsedToolCall};
use crate::tokens;
use crate::types::ThinkingMode;

/// A parsed completion.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParsedCompletion {
    /// `Some` (possibly empty) in thinking mode, `None` in chat mode.
    pub reasoning: Option<String>,
    pub content: String,
    pub tool_calls: Vec<ParsedToolCall>,
    /// The whole tool-call block as sampled, including the `"\n\n"` before it when
    /// present; rendering `content + raw_dsml` reproduces the sampled bytes (set it as
    /// [`crate::Message::raw_dsml`] for exact replay).
    pub raw_dsml: Option<String>,
}

/// Parses a whole completion (the text generated after the prompt's opener).
pub fn parse_completion(text: &str, mode: ThinkingMode) -> ParsedCompletion {
    let text = match text.find(tokens::EOS) {
        Some(pos) => &text[..pos],
        None => text,
    };
    let mut out = ParsedCompletion::default();
    let mut rest = text;
    if mode == ThinkingMode::Thinking {
        rest = rest.strip_prefix(tokens::THINK_START).unwrap_or(rest);
        match rest.find(tokens::THINK_END) {
            Some(pos) => {
                out.reasoning = Some(rest[..pos].to_string());
                rest = &rest[pos + tokens::THINK_END.len()..];
            }
            None => {
                out.reasoning = Some(rest.to_string());
                return out;
            }
        }
    }
    let Some(start) = rest.find(BLOCK_START) else {
        out.content = rest.to_string();
        return out;
    };
    let (content, prefix) = split_block_prefix(&rest[..start]);
    let block_and_after = &rest[start..];
    if let Some(end) = block_and_after.find(BLOCK_END) {
        let block = &block_and_after[..end + BLOCK_END.len()];
        if let Some(calls) = dsml::parse_block(block) {
            out.content = content.to_string();
            out.tool_calls = calls;
            out.raw_dsml = Some(format!("{prefix}{block}"));
            return out;
        }
    }
    out.content = rest.to_string();
    out
}

/// Splits off the `"\n\n"` that the official format puts before a block.
fn split_block_prefix(before: &str) -> (&str, &str) {
    match before.strip_suffix("\n\n") {
        Some(content) => (content, "\n\n"),
        None => (before, ""),
    }
}

/// One incremental parse event.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    ReasoningDelta(String),
    ContentDelta(String),
    /// A tool call begins (emitted once its whole block has been validated).
    ToolCallStart {
        index: usize,
        name: String,
    },
    /// Piece of the call's compact JSON arguments; the pieces of one call concatenate
    /// to [`ParsedToolCall::arguments_json`].
    ToolCallArgsDelta {
        index: usize,
        json_fragment: String,
    },
    /// A tool call is complete; `raw_invoke` is its exact invoke bytes.
    ToolCallEnd {
        index: usize,
        raw_invoke: String,
    },
    /// The whole tool-call block (see [`ParsedCompletion::raw_dsml`]).
    ToolBlockEnd {
        raw_dsml: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Thinking mode, waiting to see whether the text starts with `<think>`.
    Start,
    Reasoning,
    Content,
    /// Inside a tool-call block (buffered until it closes).
    Block,
    /// A block was parsed: the rest of the text is ignored.
    AfterBlock,
    /// A malformed block was seen: everything else is content.
    ContentOnly,
    /// EOS seen: the rest of the text is ignored.
    Done,
}

/// Incremental parser: feed decoded text with [`CompletionStream::push`], then call
/// [`CompletionStream::finish`]. The concatenated events, and [`CompletionStream::parsed`]
/// afterwards, equal [`parse_completion`] of the concatenated text, however it was split.
#[derive(Debug, Clone)]
pub struct CompletionStream {
    phase: Phase,
    /// Text not yet classified (held back because it may start a marker).
    pending: String,
    /// `"\n\n"` or `""` seen right before the current block.
    block_prefix: &'static str,
    /// Bytes of `pending` already searched for the block end (avoids rescanning long
    /// blocks on every push).
    block_scanned: usize,
    parsed: ParsedCompletion,
}

impl CompletionStream {
    pub fn new(mode: ThinkingMode) -> Self {
        let thinking = mode == ThinkingMode::Thinking;
        CompletionStream {
            phase: if thinking {
                Phase::Start
            } else {
                Phase::Content
            },
            pending: String::new(),
            block_prefix: "",
            block_scanned: 0,
            parsed: ParsedCompletion {
                reasoning: thinking.then(String::new),
                ..Default::default()
            },
        }
    }

    /// True while inside a tool-call block (useful for DSML-aware sampling).
    pub fn in_tool_block(&self) -> bool {
        self.phase == Phase::Block
    }

    /// True once a complete tool-call block was parsed (generation may stop).
    pub fn tool_block_done(&self) -> bool {
        self.phase == Phase::AfterBlock
    }

    /// The result so far (complete after [`CompletionStream::finish`]).
    pub fn parsed(&self) -> &ParsedCompletion {
        &self.parsed
    }

    pub fn into_parsed(self) -> ParsedCompletion {
        self.parsed
    }

    /// Feeds more generated text.
    pub fn push(&mut self, text: &str) -> Vec<StreamEvent> {
        let mut events = Vec::new();
        if matches!(self.phase, Phase::Done | Phase::AfterBlock) {
            return events;
        }
        let old_len = self.pending.len();
        self.pending.push_str(text);
        if let Some(pos) = find_from(&self.pending, tokens::EOS, old_len) {
            self.pending.truncate(pos);
            self.step(&mut events, true);
            self.phase = Phase::Done;
        } else {
            self.step(&mut events, false);
        }
        events
    }

    /// Ends the stream: everything held back is classified.
    pub fn finish(&mut self) -> Vec<StreamEvent> {
        let mut events = Vec::new();
        if !matches!(self.phase, Phase::Done | Phase::AfterBlock) {
            self.step(&mut events, true);
            self.phase = Phase::Done;
        }
        events
    }

    fn emit_reasoning(&mut self, events: &mut Vec<StreamEvent>, text: String) {
        if text.is_empty() {
            return;
        }
        self.parsed
            .reasoning
            .get_or_insert_with(String::new)
            .push_str(&text);
        events.push(StreamEvent::ReasoningDelta(text));
    }

    fn emit_content(&mut self, events: &mut Vec<StreamEvent>, text: String) {
        if text.is_empty() {
            return;
        }
        self.parsed.content.push_str(&text);
        events.push(StreamEvent::ContentDelta(text));
    }

    /// Takes the first `n` bytes of `pending`.
    fn take(&mut self, n: usize) -> String {
        let rest = self.pending.split_off(n);
        std::mem::replace(&mut self.pending, rest)
    }

    /// Classifies as much of `pending` as possible; `last` means no more text follows.
    fn step(&mut self, events: &mut Vec<StreamEvent>, last: bool) {
        loop {
            match self.phase {
                Phase::Start => {
                    if self.pending.starts_with(tokens::THINK_START) {
                        self.take(tokens::THINK_START.len());
                    } else if !last && tokens::THINK_START.starts_with(self.pending.as_str()) {
                        return;
                    }
                    self.phase = Phase::Reasoning;
                }
                Phase::Reasoning => {
                    if let Some(pos) = self.pending.find(tokens::THINK_END) {
                        let text = self.take(pos);
                        self.take(tokens::THINK_END.len());
                        self.emit_reasoning(events, text);
                        self.phase = Phase::Content;
                        continue;
                    }
                    let keep = if last {
                        0
                    } else {
                        held_suffix(&self.pending, &[tokens::THINK_END, tokens::EOS])
                    };
                    let text = self.take(self.pending.len() - keep);
                    self.emit_reasoning(events, text);
                    return;
                }
                Phase::Content => {
                    if let Some(pos) = self.pending.find(BLOCK_START) {
                        let (content, prefix) = split_block_prefix(&self.pending[..pos]);
                        let (content_len, prefix_len) = (content.len(), prefix.len());
                        self.block_prefix = if prefix_len == 0 { "" } else { "\n\n" };
                        let text = self.take(content_len);
                        self.take(prefix_len);
                        self.emit_content(events, text);
                        self.block_scanned = 0;
                        self.phase = Phase::Block;
                        continue;
                    }
                    let keep = if last {
                        0
                    } else {
                        let marker = held_suffix(&self.pending, &[BLOCK_START]);
                        // Up to two newlines before a possible block start belong to it.
                        let before = &self.pending[..self.pending.len() - marker];
                        let newlines = before.len() - before.trim_end_matches('\n').len();
                        let eos = held_suffix(&self.pending, &[tokens::EOS]);
                        (marker + newlines.min(2)).max(eos)
                    };
                    let text = self.take(self.pending.len() - keep);
                    self.emit_content(events, text);
                    return;
                }
                Phase::Block => {
                    let Some(end) = find_from(&self.pending, BLOCK_END, self.block_scanned) else {
                        self.block_scanned = self.pending.len();
                        if last {
                            self.phase = Phase::ContentOnly;
                            self.unblock(events);
                            continue;
                        }
                        return;
                    };
                    let block_len = end + BLOCK_END.len();
                    match dsml::parse_block(&self.pending[..block_len]) {
                        Some(calls) => {
                            let block = self.take(block_len);
                            self.pending.clear();
                            self.emit_calls(events, calls, format!("{}{block}", self.block_prefix));
                            self.phase = Phase::AfterBlock;
                            return;
                        }
                        None => {
                            self.phase = Phase::ContentOnly;
                            self.unblock(events);
                        }
                    }
                }
                Phase::ContentOnly => {
                    let keep = if last {
                        0
                    } else {
                        held_suffix(&self.pending, &[tokens::EOS])
                    };
                    let text = self.take(self.pending.len() - keep);
                    self.emit_content(events, text);
                    return;
                }
                Phase::AfterBlock | Phase::Done => {
                    self.pending.clear();
                    return;
                }
            }
        }
    }

    /// A block turned out malformed: its prefix goes back to content.
    fn unblock(&mut self, events: &mut Vec<StreamEvent>) {
        let prefix = std::mem::take(&mut self.block_prefix);
        self.emit_content(events, prefix.to_string());
    }

    fn emit_calls(
        &mut self,
        events: &mut Vec<StreamEvent>,
        calls: Vec<ParsedToolCall>,
        raw_dsml: String,
    ) {
        for (index, call) in calls.iter().enumerate() {
            events.push(StreamEvent::ToolCallStart {
                index,
                name: call.name.clone(),
            });
            let mut first = true;
            for (key, value) in &call.arguments {
                let member = format!("{}:{}", Value::String(key.clone()), value);
                events.push(StreamEvent::ToolCallArgsDelta {
                    index,
                    json_fragment: format!("{}{member}", if first { "{" } else { "," }),
                });
                first = false;
            }
            events.push(StreamEvent::ToolCallArgsDelta {
                index,
                json_fragment: if first { "{}".into() } else { "}".into() },
            });
            events.push(StreamEvent::ToolCallEnd {
                index,
                raw_invoke: call.raw_invoke.clone(),
            });
        }
        events.push(StreamEvent::ToolBlockEnd {
            raw_dsml: raw_dsml.clone(),
        });
        self.parsed.tool_calls = calls;
        self.parsed.raw_dsml = Some(raw_dsml);
    }
}

/// `haystack.find(needle)` for a match ending after `searched` (bytes before it were
/// already searched without a match).
fn find_from(haystack: &str, needle: &str, searched: usize) -> Option<usize> {
    let mut start = searched.saturating_sub(needle.len().saturating_sub(1));
    while !haystack.is_char_boundary(start) {
        start -= 1;
    }
    haystack.get(start..)?.find(needle).map(|p| p + start)
}

/// Length of the longest suffix of `text` that is a proper prefix of one of `markers`
/// (cut on a char boundary, so it can be held back).
fn held_suffix(text: &str, markers: &[&str]) -> usize {
    let mut best = 0;
    for marker in markers {
        let max = marker.len().saturating_sub(1).min(text.len());
        for len in (best + 1..=max).rev() {
            let start = text.len() - len;
            if text.is_char_boundary(start) && marker.starts_with(&text[start..]) {
                best = len;
                break;
            }
        }
    }
    best
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn held_suffix_finds_partial_markers() {
        assert_eq!(held_suffix("abc</thi", &["</think>"]), 5);
        assert_eq!(held_suffix("abc", &["</think>"]), 0);
        assert_eq!(held_suffix("x<｜DSML", &[BLOCK_START]), "<｜DSML".len());
    }
}
