//! The readable txn syntax of `concordctl txn` (docs/cli.md).
//!
//! ```text
//! if
//!   mod("config") = 42
//!   value("owner") = "me"
//! then
//!   put config "new value"
//!   get config
//! else
//!   get config
//! ```
//!
//! Compares: `value|version|create|mod("KEY") = != < > VALUE`. Operations: `put KEY VALUE`,
//! `get KEY [END] [--prefix]`, `del KEY [END] [--prefix]`. Words may be double-quoted, with
//! `\"` and `\\` escapes. Blank lines and lines starting with `#` are ignored. The `if`
//! and `else` sections may be empty or left out.

use concord_transport::api::{
    Compare, CompareOp, CompareTarget, DeleteRequest, KeySpan, PutRequest, RangeRequest, TxnOp,
    TxnRequest,
};

/// A syntax error with its line number (1-based).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("txn line {line}: {message}")]
pub struct SyntaxError {
    /// The line.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Splits a line into words, honouring double quotes.
fn words(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut word = String::new();
        if c == '"' {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err("unterminated quote".into()),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(e @ ('"' | '\\')) => word.push(e),
                        Some('n') => word.push('\n'),
                        other => {
                            return Err(format!(
                                "bad escape \\{}",
                                other.map(String::from).unwrap_or_default()
                            ))
                        }
                    },
                    Some(ch) => word.push(ch),
                }
            }
        } else {
            while let Some(&ch) = chars.peek() {
                if ch.is_whitespace() {
                    break;
                }
                word.push(ch);
                chars.next();
            }
        }
        out.push(word);
    }
    Ok(out)
}

fn parse_compare(line: &str) -> Result<Compare, String> {
    let open = line
        .find('(')
        .ok_or("a compare looks like: mod(\"key\") = 5")?;
    let close = line.rfind(')').ok_or("missing ')'")?;
    let target_name = line[..open].trim();
    let key = words(&line[open + 1..close])?;
    let [key] = key.as_slice() else {
        return Err("one key inside the parentheses".into());
    };
    let rest = words(&line[close + 1..])?;
    let [op, value] = rest.as_slice() else {
        return Err("expected OP VALUE after the key".into());
    };
    let op = match op.as_str() {
        "=" | "==" => CompareOp::Equal,
        "!=" => CompareOp::NotEqual,
        "<" => CompareOp::Less,
        ">" => CompareOp::Greater,
        other => return Err(format!("unknown operator {other:?} (= != < >)")),
    };
    let number = || {
        value
            .parse::<u64>()
            .map_err(|_| format!("{target_name} compares with a number, got {value:?}"))
    };
    let target = match target_name {
        "value" | "val" => CompareTarget::Value(value.clone().into_bytes()),
        "version" | "ver" => CompareTarget::Version(number()?),
        "create" | "create_revision" => CompareTarget::CreateRevision(number()?),
        "mod" | "mod_revision" => CompareTarget::ModRevision(number()?),
        other => {
            return Err(format!(
                "unknown compare target {other:?} (value, version, create, mod)"
            ))
        }
    };
    Ok(Compare {
        key: key.clone().into_bytes(),
        op,
        target,
    })
}

fn parse_span(args: &[String]) -> Result<KeySpan, String> {
    let prefix = args.iter().any(|a| a == "--prefix");
    let plain: Vec<&String> = args.iter().filter(|a| *a != "--prefix").collect();
    match (plain.as_slice(), prefix) {
        ([key], true) => Ok(KeySpan::prefix(key.as_bytes())),
        ([key], false) => Ok(KeySpan::key(key.as_bytes())),
        ([start, end], false) => Ok(KeySpan::interval(start.as_bytes(), end.as_bytes())),
        _ => Err("expected KEY [END] [--prefix]".into()),
    }
}

fn parse_op(line: &str) -> Result<TxnOp, String> {
    let w = words(line)?;
    let (verb, args) = w.split_first().ok_or("empty operation")?;
    match verb.as_str() {
        "put" => match args {
            [key, value] => Ok(TxnOp::Put(PutRequest {
                key: key.clone().into_bytes(),
                value: value.clone().into_bytes(),
                lease: 0,
                prev_kv: false,
            })),
            _ => Err("expected: put KEY VALUE".into()),
        },
        "get" => Ok(TxnOp::Range(RangeRequest::new(parse_span(args)?))),
        "del" | "delete" => Ok(TxnOp::Delete(DeleteRequest {
            span: parse_span(args)?,
            prev_kv: false,
        })),
        other => Err(format!("unknown operation {other:?} (put, get, del)")),
    }
}

/// Parses a txn written in the syntax of the module documentation.
pub fn parse(text: &str) -> Result<TxnRequest, SyntaxError> {
    #[derive(PartialEq)]
    enum Section {
        Start,
        If,
        Then,
        Else,
    }
    let mut section = Section::Start;
    let mut txn = TxnRequest::default();
    for (i, raw) in text.lines().enumerate() {
        let err = |message: String| SyntaxError {
            line: i + 1,
            message,
        };
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let next = match line {
            "if" if section == Section::Start => Some(Section::If),
            "then" if matches!(section, Section::Start | Section::If) => Some(Section::Then),
            "else" if section == Section::Then => Some(Section::Else),
            "if" | "then" | "else" => {
                return Err(err(format!(
                    "{line:?} out of place (order: if, then, else)"
                )))
            }
            _ => None,
        };
        if let Some(next) = next {
            section = next;
            continue;
        }
        match section {
            Section::Start => return Err(err("a txn starts with `if` or `then`".into())),
            Section::If => txn.compares.push(parse_compare(line).map_err(err)?),
            Section::Then => txn.success.push(parse_op(line).map_err(err)?),
            Section::Else => txn.failure.push(parse_op(line).map_err(err)?),
        }
    }
    if section == Section::Start {
        return Err(SyntaxError {
            line: 0,
            message: "empty txn".into(),
        });
    }
    Ok(txn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_txn() {
        let txn = parse(
            r#"
            if
              mod("config") = 42
              value("owner") != "me \"too\""
              version(v) < 3
              create(c) > 0
            then
              put config "new value"
              get config
              del a z
            else
              get p/ --prefix
            "#,
        )
        .unwrap();
        assert_eq!(txn.compares.len(), 4);
        assert_eq!(
            txn.compares[0],
            Compare {
                key: b"config".to_vec(),
                op: CompareOp::Equal,
                target: CompareTarget::ModRevision(42)
            }
        );
        assert_eq!(
            txn.compares[1].target,
            CompareTarget::Value(b"me \"too\"".to_vec())
        );
        assert_eq!(txn.success.len(), 3);
        assert!(matches!(&txn.success[0], TxnOp::Put(p) if p.value == b"new value"));
        assert!(
            matches!(&txn.success[2], TxnOp::Delete(d) if d.span == KeySpan::interval("a", "z"))
        );
        assert!(matches!(&txn.failure[0], TxnOp::Range(r) if r.span == KeySpan::prefix("p/")));
    }

    #[test]
    fn reports_errors_with_line_numbers() {
        assert_eq!(parse("if\n  mod(k) ~ 1\n").unwrap_err().line, 2);
        assert_eq!(parse("then\n  frob k\n").unwrap_err().line, 2);
        assert_eq!(parse("then\nif\n").unwrap_err().line, 2);
        assert!(parse("if\n mod(k) = x\n")
            .unwrap_err()
            .message
            .contains("number"));
        assert!(parse("").is_err());
    }
}
