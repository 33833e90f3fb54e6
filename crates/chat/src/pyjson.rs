//! JSON text exactly as Python's `json.dumps(value, ensure_ascii=False)` writes it
//! (the official encoder's `to_json`): `", "` / `": "` separators, Python float repr,
//! only `"`, `\` and control characters escaped.

use serde_json::{Number, Value};

/// `json.dumps(value, ensure_ascii=False)`.
pub fn to_python_json(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value);
    out
}

fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_string(out, k);
                out.push_str(": ");
                write_value(out, v);
            }
            out.push('}');
        }
    }
}

/// A JSON string literal with Python's escaping (`ensure_ascii=False`).
pub fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_number(out: &mut String, n: &Number) {
    if let Some(i) = n.as_i64() {
        out.push_str(&i.to_string());
    } else if let Some(u) = n.as_u64() {
        out.push_str(&u.to_string());
    } else if let Some(f) = n.as_f64() {
        out.push_str(&python_float_repr(f));
    } else {
        out.push_str(&n.to_string());
    }
}

/// Python `repr(float)`: shortest round-trip digits, fixed notation for decimal
/// exponents in [-4, 16), otherwise `d.ddde+XX` with at least two exponent digits.
pub fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let sign = if f.is_sign_negative() { "-" } else { "" };
    let (digits, exp) = shortest_digits(f.abs());
    let mut out = String::from(sign);
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                out.push_str(&digits);
                out.push_str(&"0".repeat(int_len - digits.len()));
                out.push_str(".0");
            } else {
                out.push_str(&digits[..int_len]);
                out.push('.');
                out.push_str(&digits[int_len..]);
            }
        } else {
            out.push_str("0.");
            out.push_str(&"0".repeat((-exp - 1) as usize));
            out.push_str(&digits);
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        out.push('e');
        out.push(if exp < 0 { '-' } else { '+' });
        out.push_str(&format!("{:02}", exp.abs()));
    }
    out
}

/// Significant digits and decimal exponent of `x` (scientific: d.ddd × 10^exp).
fn split_scientific(sci: &str) -> (String, i32) {
    let (mantissa, exp) = match sci.split_once('e') {
        Some((m, e)) => (m, e.parse::<i32>().unwrap_or(0)),
        None => (sci, 0),
    };
    (mantissa.chars().filter(|c| *c != '.').collect(), exp)
}

/// Shortest round-trip digits of a non-negative finite `x`, choosing like Python
/// (David Gay's dtoa): among shortest candidates the one nearest to the exact binary
/// value, ties to even. Rust's shortest formatting breaks such ties upwards
/// (83999701305320.125 → "…13" where Python writes "…12").
fn shortest_digits(x: f64) -> (String, i32) {
    let (digits, exp) = split_scientific(&format!("{x:e}"));
    let n = digits.len();
    // Exact decimal expansion of the double (at most 767 significant digits).
    let (exact, exact_exp) = split_scientific(&format!("{x:.800e}"));
    if exact_exp != exp || exact.len() <= n {
        return (digits, exp);
    }
    let (head, tail) = exact.split_at(n);
    let first = tail.as_bytes().first().copied().unwrap_or(b'0');
    let rest_zero = tail.bytes().skip(1).all(|b| b == b'0');
    let last_odd = head.bytes().last().is_some_and(|b| (b - b'0') % 2 == 1);
    let round_up = first > b'5' || (first == b'5' && (!rest_zero || last_odd));
    let mut rounded: Vec<u8> = head.bytes().collect();
    if round_up {
        let mut i = rounded.len();
        loop {
            if i == 0 {
                return (digits, exp); // carry out of the leading digit: keep Rust's
            }
            i -= 1;
            if rounded[i] == b'9' {
                rounded[i] = b'0';
            } else {
                rounded[i] += 1;
                break;
            }
        }
    }
    let candidate = String::from_utf8(rounded).unwrap_or_default();
    let text = format!("0.{candidate}e{}", exp + 1);
    if text.parse::<f64>().ok() == Some(x) {
        let trimmed = candidate.trim_end_matches('0');
        let trimmed = if trimmed.is_empty() { "0" } else { trimmed };
        (trimmed.to_string(), exp)
    } else {
        (digits, exp)
    }
}

/// Python truthiness of a JSON value (`if tools:` / `if response_format:`).
pub fn is_truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn float_repr_matches_python() {
        // Expected strings are Python 3.11 `repr(float)` outputs.
        let cases = [
            (1.5, "1.5"),
            (100000.0, "100000.0"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (-2.5e-7, "-2.5e-07"),
            (0.1, "0.1"),
            (123456789.125, "123456789.125"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (f64::from_bits(4815220382915230216), "83999701305320.12"),
            (0.5, "0.5"),
            (9.5, "9.5"),
            (5e-324, "5e-324"),
        ];
        for (f, want) in cases {
            assert_eq!(python_float_repr(f), want, "{f}");
        }
    }

    #[test]
    fn dumps_matches_python() {
        let v: Value =
            serde_json::from_str(r#"{"a": [1, 2.0, "x\"\n\u0001é"], "b": {}, "c": [], "d": null}"#)
                .unwrap();
        assert_eq!(
            to_python_json(&v),
            "{\"a\": [1, 2.0, \"x\\\"\\n\\u0001é\"], \"b\": {}, \"c\": [], \"d\": null}"
        );
        assert_eq!(to_python_json(&json!("\u{7f}\t")), "\"\u{7f}\\t\"");
    }
}
