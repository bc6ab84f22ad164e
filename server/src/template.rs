//! Chat templates rendered with HF semantics (transformers `chat_template_utils.py`,
//! `_compile_jinja_template`): an environment with `trim_blocks` and `lstrip_blocks`, loop
//! controls, `raise_exception`, `strftime_now`, a `tojson` that writes JSON the way Python's
//! `json.dumps(ensure_ascii=False)` does, and Python string/dict methods (minijinja-contrib's
//! pycompat: `.strip()`, `.split()`, `.items()`, ...).

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

use crate::error::{Result, ServerError};

/// One message as the template sees it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

/// `raise_exception(msg)`: the template rejects the conversation; `msg` reaches the client.
fn raise_exception(msg: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=False)`.
fn py_json(v: &serde_json::Value, indent: Option<usize>, level: usize, out: &mut String) {
    use serde_json::Value as J;
    let nl = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                nl(out, level + 1);
                py_json(x, indent, level + 1, out);
            }
            nl(out, level);
            out.push(']');
        }
        J::Object(m) if !m.is_empty() => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                nl(out, level + 1);
                out.push_str(&serde_json::to_string(k).expect("string"));
                out.push_str(": ");
                py_json(x, indent, level + 1, out);
            }
            nl(out, level);
            out.push('}');
        }
        J::Number(n) if n.is_f64() => {
            // Python prints floats with a fractional part: 1.0, not 1.
            let f = n.as_f64().unwrap_or_default();
            if f.fract() == 0.0 && f.abs() < 1e16 {
                out.push_str(&format!("{f:.1}"));
            } else {
                out.push_str(&n.to_string());
            }
        }
        other => out.push_str(&serde_json::to_string(other).expect("json")),
    }
}

fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    py_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

/// `strftime_now(format)` (transformers passes it to templates, e.g. Llama 3.2's date line).
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(&format, secs)
}

/// A small strftime over UTC for the directives chat templates use.
fn strftime(format: &str, unix: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = unix.div_euclid(86_400);
    let rem = unix.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('B') => out.push_str(month),
            Some('b') => out.push_str(&month[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('j') => out.push_str(&format!("{:03}", doy_of(y, m, d))),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

fn doy_of(y: i64, m: i64, d: i64) -> i64 {
    const CUM: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    CUM[(m - 1) as usize] + d + i64::from(leap && m > 2)
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat_template", source.to_string())
            .map_err(|e| ServerError::Template(format!("the chat template does not parse: {e}")))?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Render `messages` with `add_generation_prompt`, as `apply_chat_template(tokenize=False)`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with(
            Value::from_serialize(messages),
            add_generation_prompt,
            Value::UNDEFINED,
        )
    }

    /// Render arbitrary message values (tests feed the huggingface.js vectors through this).
    pub fn render_with(
        &self,
        messages: Value,
        add_generation_prompt: bool,
        extra: Value,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat_template")
            .expect("added in new");
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
            ..extra
        };
        tmpl.render(ctx).map_err(|e| {
            // A raise_exception() carries the template's own message as the detail.
            let msg = match (e.kind(), e.detail()) {
                (ErrorKind::InvalidOperation, Some(d)) => d.to_string(),
                _ => format!("{e:#}"),
            };
            ServerError::Template(msg)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_whitespace_and_raise_exception() {
        let t = ChatTemplate::new(
            "{% for m in messages %}\n  {% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}\n<{{ m.role }}>{{ m.content | trim }}\n{% endfor %}\n{% if add_generation_prompt %}<assistant>{% endif %}\n",
            None,
            None,
        )
        .unwrap();
        let user = Message {
            role: "user".into(),
            content: " hi ".into(),
        };
        assert_eq!(
            t.render(std::slice::from_ref(&user), true).unwrap(),
            "<user>hi\n<assistant>"
        );
        let sys = Message {
            role: "system".into(),
            content: "x".into(),
        };
        let err = t.render(&[sys, user], true).unwrap_err();
        assert_eq!(err.to_string(), "chat template: System role not supported");
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let t =
            ChatTemplate::new("{{ x | tojson }}|{{ x | tojson(indent=2) }}", None, None).unwrap();
        let x = serde_json::json!({"b": [1, 2.0, "é<"], "a": {}});
        let out = t
            .render_with(
                Value::UNDEFINED,
                false,
                minijinja::context! { x => Value::from_serialize(&x) },
            )
            .unwrap();
        assert_eq!(
            out,
            "{\"b\": [1, 2.0, \"é<\"], \"a\": {}}|{\n  \"b\": [\n    1,\n    2.0,\n    \"é<\"\n  ],\n  \"a\": {}\n}"
        );
    }

    #[test]
    fn strftime_directives() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        assert_eq!(
            strftime("%d %b %Y %H:%M:%S %A %j", 1_722_000_309),
            "26 Jul 2024 13:25:09 Friday 208"
        );
    }
}
