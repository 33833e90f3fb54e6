//! Prompt rendering, byte-identical to DeepSeek's official `encoding_dsv4.encode_messages`
//! (`context=None`, `add_default_bos_token=True`).

use serde_json::Value;

use crate::dsml;
use crate::pyjson::{is_truthy, to_python_json};
use crate::types::{ChatRequest, Content, Message, ReasoningEffort, ThinkingMode, ToolCall};
use crate::{Error, Result, tokens};

const REASONING_EFFORT_MAX: &str = "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n\
You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n\
Explicitly write out your entire deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n";

const TOOLS_HEAD: &str = "## Tools\n\n\
You have access to a set of tools to help answer the user's question. You can invoke tools by writing a \"<｜DSML｜tool_calls>\" block like the following:\n\n\
<｜DSML｜tool_calls>\n\
<｜DSML｜invoke name=\"$TOOL_NAME\">\n\
<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n\
...\n\
</｜DSML｜invoke>\n\
<｜DSML｜invoke name=\"$TOOL_NAME2\">\n\
...\n\
</｜DSML｜invoke>\n\
</｜DSML｜tool_calls>\n\n\
String parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\n\
If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.\n\n\
Otherwise, output directly after </think> with tool calls or final response.\n\n\
### Available Tool Schemas\n\n";

const TOOLS_TAIL: &str = "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n";

const RESPONSE_FORMAT_HEAD: &str =
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n";

const VALID_TASKS: [(&str, &str); 6] = [
    ("action", "<｜action｜>"),
    ("query", "<｜query｜>"),
    ("authority", "<｜authority｜>"),
    ("domain", "<｜domain｜>"),
    ("title", "<｜title｜>"),
    ("read_url", "<｜read_url｜>"),
];

/// One block of a merged user turn.
#[derive(Debug, Clone)]
enum Block {
    Text(Content),
    ToolResult {
        call_id: Option<String>,
        content: Content,
    },
}

/// A message after the official preprocessing (tool messages merged into user turns).
#[derive(Debug, Clone)]
struct Turn<'a> {
    role: &'a str,
    /// Original message (for every role except merged user turns' extra blocks).
    msg: &'a Message,
    /// Present for user turns (they always carry blocks after merging).
    blocks: Option<Vec<Block>>,
    /// True for user turns synthesised from a tool message (they carry no task).
    from_tool: bool,
    /// Reasoning removed by the drop-thinking pass.
    reasoning_dropped: bool,
}

impl Turn<'_> {
    fn task(&self) -> Option<&str> {
        if self.from_tool {
            None
        } else {
            self.msg.task.as_deref()
        }
    }
}

/// Renders a conversation exactly like the official encoder.
pub fn render(req: &ChatRequest) -> Result<String> {
    let with_top_level;
    let messages: &[Message] = if req.tools.is_some() || req.response_format.is_some() {
        with_top_level = attach_top_level(req);
        &with_top_level
    } else {
        &req.messages
    };
    render_messages(
        messages,
        req.thinking_mode,
        req.reasoning_effort,
        req.drop_thinking,
    )
}

/// Top-level `tools` / `response_format` go on a leading system message.
fn attach_top_level(req: &ChatRequest) -> Vec<Message> {
    let mut messages = req.messages.clone();
    if messages.first().is_none_or(|m| m.role != "system") {
        messages.insert(
            0,
            Message {
                role: "system".into(),
                ..Default::default()
            },
        );
    }
    if let Some(first) = messages.first_mut() {
        if let Some(tools) = &req.tools {
            first
                .tools
                .get_or_insert_with(Vec::new)
                .extend(tools.iter().cloned());
        }
        if let Some(rf) = &req.response_format {
            first.response_format = Some(rf.clone());
        }
    }
    messages
}

/// Renders messages with explicit encoder options (official `encode_messages`).
pub fn render_messages(
    messages: &[Message],
    thinking_mode: ThinkingMode,
    reasoning_effort: Option<ReasoningEffort>,
    drop_thinking: bool,
) -> Result<String> {
    let mut turns = merge_tool_messages(messages);
    sort_tool_results_by_call_order(&mut turns);

    let mut prompt = String::from(tokens::BOS);
    let any_tools = turns
        .iter()
        .any(|t| t.blocks.is_none() && t.msg.tools.as_ref().is_some_and(|v| !v.is_empty()));
    let drop_thinking = drop_thinking && !any_tools;
    let thinking = thinking_mode == ThinkingMode::Thinking;
    if thinking && drop_thinking {
        turns = drop_thinking_turns(turns);
    }
    let last_user_idx = last_user_index(&turns);
    for index in 0..turns.len() {
        render_turn(
            &mut prompt,
            index,
            &turns,
            last_user_idx,
            thinking,
            drop_thinking,
            reasoning_effort,
        )?;
    }
    Ok(prompt)
}

fn merge_tool_messages(messages: &[Message]) -> Vec<Turn<'_>> {
    let mut merged: Vec<Turn<'_>> = Vec::with_capacity(messages.len());
    for msg in messages {
        match msg.role.as_str() {
            "tool" | "function" => {
                let block = Block::ToolResult {
                    call_id: msg.tool_call_id.clone(),
                    content: msg.content.clone(),
                };
                match merged.last_mut() {
                    Some(Turn {
                        role: "user",
                        blocks: Some(blocks),
                        ..
                    }) => blocks.push(block),
                    _ => merged.push(Turn {
                        role: "user",
                        msg,
                        blocks: Some(vec![block]),
                        from_tool: true,
                        reasoning_dropped: false,
                    }),
                }
            }
            "user" => {
                let block = Block::Text(msg.content.clone());
                let last_taskless_user = merged
                    .last()
                    .is_some_and(|t| t.role == "user" && t.blocks.is_some() && t.task().is_none());
                match merged.last_mut() {
                    Some(Turn {
                        blocks: Some(blocks),
                        ..
                    }) if last_taskless_user => blocks.push(block),
                    _ => merged.push(Turn {
                        role: "user",
                        msg,
                        blocks: Some(vec![block]),
                        from_tool: false,
                        reasoning_dropped: false,
                    }),
                }
            }
            _ => merged.push(Turn {
                role: msg.role.as_str(),
                msg,
                blocks: None,
                from_tool: false,
                reasoning_dropped: false,
            }),
        }
    }
    merged
}

fn call_id(call: &ToolCall) -> Option<&str> {
    call.id
        .as_deref()
        .filter(|s| !s.is_empty())
        .or(call.function.id.as_deref())
        .filter(|s| !s.is_empty())
}

/// Results of one assistant turn's parallel calls are put in call order (stable; an
/// unknown id sorts as position 0, as in the official encoder).
fn sort_tool_results_by_call_order(turns: &mut [Turn<'_>]) {
    let mut order: Vec<(String, usize)> = Vec::new();
    for turn in turns.iter_mut() {
        if turn.role == "assistant" && turn.blocks.is_none() {
            if let Some(calls) = turn.msg.tool_calls.as_ref().filter(|c| !c.is_empty()) {
                order.clear();
                for (idx, call) in calls.iter().enumerate() {
                    if let Some(id) = call_id(call) {
                        // Later duplicates overwrite, like a Python dict.
                        match order.iter_mut().find(|(k, _)| k == id) {
                            Some(entry) => entry.1 = idx,
                            None => order.push((id.to_string(), idx)),
                        }
                    }
                }
            }
        } else if turn.role == "user" {
            let Some(blocks) = turn.blocks.as_mut() else {
                continue;
            };
            let n_results = blocks
                .iter()
                .filter(|b| matches!(b, Block::ToolResult { .. }))
                .count();
            if n_results <= 1 || order.is_empty() {
                continue;
            }
            let key = |b: &Block| match b {
                Block::ToolResult { call_id, .. } => call_id
                    .as_deref()
                    .and_then(|id| order.iter().find(|(k, _)| k == id))
                    .map_or(0, |(_, i)| *i),
                Block::Text(_) => 0,
            };
            let mut results: Vec<Block> = blocks
                .iter()
                .filter(|b| matches!(b, Block::ToolResult { .. }))
                .cloned()
                .collect();
            results.sort_by_key(key);
            let mut sorted = results.into_iter();
            for block in blocks.iter_mut() {
                if matches!(block, Block::ToolResult { .. })
                    && let Some(next) = sorted.next()
                {
                    *block = next;
                }
            }
        }
    }
}

fn last_user_index(turns: &[Turn<'_>]) -> Option<usize> {
    turns
        .iter()
        .rposition(|t| t.role == "user" || t.role == "developer")
}

/// Official `_drop_thinking_messages`: before the last user/developer turn, assistant
/// reasoning is removed and developer (or unknown-role) messages are dropped.
fn drop_thinking_turns(turns: Vec<Turn<'_>>) -> Vec<Turn<'_>> {
    let last_user = last_user_index(&turns);
    let mut out = Vec::with_capacity(turns.len());
    for (idx, mut turn) in turns.into_iter().enumerate() {
        let at_or_after = last_user.is_none_or(|l| idx >= l);
        if at_or_after
            || matches!(
                turn.role,
                "user" | "system" | "tool" | "latest_reminder" | "direct_search_results"
            )
        {
            out.push(turn);
        } else if turn.role == "assistant" {
            turn.reasoning_dropped = true;
            out.push(turn);
        }
    }
    out
}

fn render_tools(out: &mut String, tools: &[Value]) -> Result<()> {
    out.push_str(TOOLS_HEAD);
    for (i, tool) in tools.iter().enumerate() {
        let function = tool.get("function").ok_or(Error::ToolWithoutFunction)?;
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&to_python_json(function));
    }
    out.push_str(TOOLS_TAIL);
    Ok(())
}

fn render_tools_and_format(out: &mut String, msg: &Message) -> Result<()> {
    if let Some(tools) = msg.tools.as_ref().filter(|t| !t.is_empty()) {
        out.push_str("\n\n");
        render_tools(out, tools)?;
    }
    if let Some(rf) = msg.response_format.as_ref().filter(|v| is_truthy(v)) {
        out.push_str("\n\n");
        out.push_str(RESPONSE_FORMAT_HEAD);
        out.push_str(&to_python_json(rf));
    }
    Ok(())
}

fn render_blocks(out: &mut String, blocks: &[Block]) {
    for (i, block) in blocks.iter().enumerate() {
        if i > 0 {
            out.push_str("\n\n");
        }
        match block {
            Block::Text(content) => out.push_str(&content.text_or_empty()),
            Block::ToolResult { content, .. } => {
                out.push_str("<tool_result>");
                out.push_str(&content.text_python());
                out.push_str("</tool_result>");
            }
        }
    }
}

fn render_turn(
    out: &mut String,
    index: usize,
    turns: &[Turn<'_>],
    last_user_idx: Option<usize>,
    thinking: bool,
    drop_thinking: bool,
    reasoning_effort: Option<ReasoningEffort>,
) -> Result<()> {
    let Some(turn) = turns.get(index) else {
        return Ok(());
    };
    let msg = turn.msg;
    if index == 0 && thinking && reasoning_effort == Some(ReasoningEffort::Max) {
        out.push_str(REASONING_EFFORT_MAX);
    }
    let after_last_user = last_user_idx.is_none_or(|l| index > l);
    match (turn.role, &turn.blocks) {
        ("user", Some(blocks)) => {
            out.push_str(tokens::USER);
            render_blocks(out, blocks);
        }
        ("system", _) => {
            out.push_str(&msg.content.text_or_empty());
            render_tools_and_format(out, msg)?;
        }
        ("developer", _) => {
            if !msg.content.is_truthy() {
                return Err(Error::DeveloperWithoutContent);
            }
            out.push_str(tokens::USER);
            out.push_str(&msg.content.text_or_empty());
            render_tools_and_format(out, msg)?;
        }
        ("latest_reminder", _) => {
            out.push_str(tokens::LATEST_REMINDER);
            out.push_str(&msg.content.text_python());
        }
        ("assistant", _) => {
            let prev_has_task =
                index > 0 && turns.get(index - 1).is_some_and(|t| t.task().is_some());
            if thinking && !prev_has_task && (!drop_thinking || after_last_user) {
                if !turn.reasoning_dropped {
                    out.push_str(msg.reasoning_content.as_deref().unwrap_or(""));
                }
                out.push_str(tokens::THINK_END);
            }
            out.push_str(&msg.content.text_or_empty());
            if let Some(raw) = &msg.raw_dsml {
                out.push_str(raw);
            } else if let Some(calls) = msg.tool_calls.as_ref().filter(|c| !c.is_empty()) {
                out.push_str(&dsml::render_tool_calls(calls)?);
            }
            if !msg.wo_eos {
                out.push_str(tokens::EOS);
            }
        }
        (role, _) => return Err(Error::UnknownRole(role.to_string())),
    }

    // Generation openers only come before an assistant / latest_reminder turn or at the end.
    if let Some(next) = turns.get(index + 1)
        && next.role != "assistant"
        && next.role != "latest_reminder"
    {
        return Ok(());
    }
    let think_tag = |out: &mut String| {
        out.push_str(if thinking {
            tokens::THINK_START
        } else {
            tokens::THINK_END
        })
    };
    if let Some(task) = turn.task() {
        let token = VALID_TASKS
            .iter()
            .find(|(name, _)| *name == task)
            .map(|(_, tok)| *tok)
            .ok_or_else(|| Error::InvalidTask(task.to_string()))?;
        if task == "action" {
            out.push_str(tokens::ASSISTANT);
            think_tag(out);
        }
        out.push_str(token);
    } else if turn.role == "user" || turn.role == "developer" {
        out.push_str(tokens::ASSISTANT);
        let at_or_after_last = last_user_idx.is_none_or(|l| index >= l);
        if thinking && (!drop_thinking || at_or_after_last) {
            out.push_str(tokens::THINK_START);
        } else {
            out.push_str(tokens::THINK_END);
        }
    }
    Ok(())
}
