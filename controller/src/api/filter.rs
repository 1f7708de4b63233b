//! `?filter=`: LXD-style filters on list endpoints, e.g.
//! `status eq running and (config.limits.cpu eq 2 or not name eq "web 1")`.
//!
//! Grammar (keywords and operators in any case; `not` binds tighter than `and`, `and` tighter
//! than `or`):
//!
//! ```text
//! filter     = or
//! or         = and { "or" and }
//! and        = unary { "and" unary }
//! unary      = "not" unary | "(" or ")" | comparison
//! comparison = FIELD ( "eq" | "ne" ) VALUE
//! ```
//!
//! A FIELD is a bare word (`name`, `status`, `location`, `project`, `config.limits.cpu`, ...);
//! a VALUE is a bare word or a quoted string (`"a b"` or `'a b'`, with `\` escaping the quote
//! and itself). Comparisons are exact, except on `status`, which ignores case. A field the
//! object does not have compares as the empty string. [`Filter::matches_json`] finds fields
//! in an object as the API shows it ([`json_field`]). See `docs/filtering.md`.

/// Longest filter accepted, in bytes.
pub const MAX_FILTER_LEN: usize = 4096;

/// Deepest nesting of parentheses and `not` accepted.
const MAX_DEPTH: usize = 64;

/// A parsed filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    expr: Expr,
}

/// A filter expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// `field eq value`.
    Eq(String, String),
    /// `field ne value`.
    Ne(String, String),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    Quoted(String),
    Open,
    Close,
}

/// A token and the 1-based character position it starts at.
#[derive(Debug, Clone)]
struct Spanned {
    token: Token,
    pos: usize,
}

impl Token {
    fn describe(&self) -> String {
        match self {
            Token::Word(w) => format!("{w:?}"),
            Token::Quoted(q) => format!("the quoted value {q:?}"),
            Token::Open => "\"(\"".into(),
            Token::Close => "\")\"".into(),
        }
    }

    fn is_keyword(&self, kw: &str) -> bool {
        matches!(self, Token::Word(w) if w.eq_ignore_ascii_case(kw))
    }
}

fn tokenize(input: &str) -> Result<Vec<Spanned>, String> {
    let mut out = Vec::new();
    let mut chars = input.chars().enumerate().peekable();
    while let Some((i, c)) = chars.next() {
        let pos = i + 1;
        match c {
            c if c.is_whitespace() => {}
            '(' => out.push(Spanned {
                token: Token::Open,
                pos,
            }),
            ')' => out.push(Spanned {
                token: Token::Close,
                pos,
            }),
            '"' | '\'' => {
                let quote = c;
                let mut value = String::new();
                let mut closed = false;
                while let Some((_, c)) = chars.next() {
                    match c {
                        '\\' => match chars.next() {
                            Some((_, e)) => value.push(e),
                            None => break,
                        },
                        c if c == quote => {
                            closed = true;
                            break;
                        }
                        c => value.push(c),
                    }
                }
                if !closed {
                    return Err(format!(
                        "the quote at position {pos} of the filter is never closed"
                    ));
                }
                out.push(Spanned {
                    token: Token::Quoted(value),
                    pos,
                });
            }
            c => {
                let mut word = String::from(c);
                while let Some((_, c)) = chars.peek() {
                    if c.is_whitespace() || matches!(c, '(' | ')' | '"' | '\'') {
                        break;
                    }
                    word.push(*c);
                    chars.next();
                }
                out.push(Spanned {
                    token: Token::Word(word),
                    pos,
                });
            }
        }
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<Spanned>,
    next: usize,
    /// Length of the input in characters (for "at the end" positions).
    end: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Spanned> {
        self.tokens.get(self.next)
    }

    fn bump(&mut self) -> Option<Spanned> {
        let t = self.tokens.get(self.next).cloned();
        if t.is_some() {
            self.next += 1;
        }
        t
    }

    fn peek_keyword(&self, kw: &str) -> bool {
        self.peek().is_some_and(|t| t.token.is_keyword(kw))
    }

    fn or(&mut self, depth: usize) -> Result<Expr, String> {
        let mut left = self.and(depth)?;
        while self.peek_keyword("or") {
            self.bump();
            let right = self.and(depth)?;
            left = Expr::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self, depth: usize) -> Result<Expr, String> {
        let mut left = self.unary(depth)?;
        while self.peek_keyword("and") {
            self.bump();
            let right = self.unary(depth)?;
            left = Expr::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self, depth: usize) -> Result<Expr, String> {
        if depth > MAX_DEPTH {
            let pos = self.peek().map_or(self.end, |t| t.pos);
            return Err(format!(
                "the filter nests more than {MAX_DEPTH} levels deep at position {pos}"
            ));
        }
        let Some(t) = self.bump() else {
            return Err(format!(
                "the filter ends at position {} where a comparison (such as name eq web1) was expected",
                self.end + 1
            ));
        };
        match &t.token {
            tok if tok.is_keyword("not") => Ok(Expr::Not(Box::new(self.unary(depth + 1)?))),
            Token::Open => {
                let inner = self.or(depth + 1)?;
                match self.bump() {
                    Some(Spanned {
                        token: Token::Close,
                        ..
                    }) => Ok(inner),
                    Some(other) => Err(format!(
                        "expected \")\" at position {} of the filter (to close the \"(\" at position {}), found {}",
                        other.pos,
                        t.pos,
                        other.token.describe()
                    )),
                    None => Err(format!(
                        "the \"(\" at position {} of the filter is never closed",
                        t.pos
                    )),
                }
            }
            Token::Word(field) if !is_reserved(field) => {
                let field = field.clone();
                let op = match self.bump() {
                    Some(Spanned {
                        token: Token::Word(op),
                        ..
                    }) if op.eq_ignore_ascii_case("eq") || op.eq_ignore_ascii_case("ne") => {
                        op.to_ascii_lowercase()
                    }
                    Some(other) => {
                        return Err(format!(
                            "expected eq or ne after {field:?} at position {} of the filter, found {}",
                            other.pos,
                            other.token.describe()
                        ));
                    }
                    None => {
                        return Err(format!(
                            "the filter ends after {field:?} at position {} where eq or ne was expected",
                            self.end + 1
                        ));
                    }
                };
                let value = match self.bump() {
                    Some(Spanned {
                        token: Token::Word(v) | Token::Quoted(v),
                        ..
                    }) => v,
                    Some(other) => {
                        return Err(format!(
                            "expected a value after {op} at position {} of the filter, found {}",
                            other.pos,
                            other.token.describe()
                        ));
                    }
                    None => {
                        return Err(format!(
                            "the filter ends at position {} where a value after {op} was expected",
                            self.end + 1
                        ));
                    }
                };
                Ok(if op == "eq" {
                    Expr::Eq(field, value)
                } else {
                    Expr::Ne(field, value)
                })
            }
            other => Err(format!(
                "expected a comparison (such as name eq web1) at position {} of the filter, found {}",
                t.pos,
                other.describe()
            )),
        }
    }
}

/// Words that cannot start a comparison.
fn is_reserved(word: &str) -> bool {
    ["and", "or", "eq", "ne"]
        .iter()
        .any(|k| word.eq_ignore_ascii_case(k))
}

impl Filter {
    /// Parses a filter; the error is one sentence naming the position (1-based, in
    /// characters) where the filter went wrong.
    pub fn parse(input: &str) -> Result<Filter, String> {
        if input.len() > MAX_FILTER_LEN {
            return Err(format!("the filter is longer than {MAX_FILTER_LEN} bytes"));
        }
        let tokens = tokenize(input)?;
        if tokens.is_empty() {
            return Err("the filter is empty".into());
        }
        let mut parser = Parser {
            tokens,
            next: 0,
            end: input.chars().count(),
        };
        let expr = parser.or(0)?;
        if let Some(extra) = parser.peek() {
            return Err(match extra.token {
                Token::Close => format!(
                    "the \")\" at position {} of the filter has no matching \"(\"",
                    extra.pos
                ),
                ref t => format!(
                    "expected and or or at position {} of the filter, found {}",
                    extra.pos,
                    t.describe()
                ),
            });
        }
        Ok(Filter { expr })
    }

    /// The parsed expression.
    pub fn expr(&self) -> &Expr {
        &self.expr
    }

    /// Whether an object matches: `get` gives the value of a field (`None`: the object has
    /// no such field, which compares as the empty string).
    pub fn matches(&self, get: &dyn Fn(&str) -> Option<String>) -> bool {
        self.expr.eval(get)
    }

    /// Whether an object, as the API shows it (JSON), matches; fields are found with
    /// [`json_field`].
    pub fn matches_json(&self, object: &serde_json::Value) -> bool {
        self.matches(&|field| json_field(object, field))
    }
}

/// The value of a filter field in an API object: a top-level member (`name`, `status`,
/// `location`, `project`, ...), or `MAP.KEY` for a member of a string map such as
/// `config.limits.cpu` or `properties.os`. `config.KEY` looks in `expanded_config` (profiles
/// included) when the object has one. Numbers and booleans compare as their JSON text, lists
/// as their items joined with `,`; objects and missing members are `None`.
pub fn json_field(object: &serde_json::Value, field: &str) -> Option<String> {
    use serde_json::Value;
    fn text(v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(_) | Value::Bool(_) => Some(v.to_string()),
            Value::Array(items) => {
                Some(items.iter().filter_map(text).collect::<Vec<_>>().join(","))
            }
            Value::Null | Value::Object(_) => None,
        }
    }
    if let Some(v) = object.get(field) {
        return text(v);
    }
    let (map, key) = field.split_once('.')?;
    let map = if map == "config" && object.get("expanded_config").is_some() {
        "expanded_config"
    } else {
        map
    };
    object.get(map)?.get(key).and_then(text)
}

impl Expr {
    fn eval(&self, get: &dyn Fn(&str) -> Option<String>) -> bool {
        match self {
            Expr::Eq(field, value) => field_equals(field, value, get),
            Expr::Ne(field, value) => !field_equals(field, value, get),
            Expr::Not(e) => !e.eval(get),
            Expr::And(a, b) => a.eval(get) && b.eval(get),
            Expr::Or(a, b) => a.eval(get) || b.eval(get),
        }
    }
}

fn field_equals(field: &str, value: &str, get: &dyn Fn(&str) -> Option<String>) -> bool {
    let actual = get(field).unwrap_or_default();
    if field.eq_ignore_ascii_case("status") {
        actual.eq_ignore_ascii_case(value)
    } else {
        actual == value
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn object(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn matches(filter: &str, obj: &BTreeMap<String, String>) -> bool {
        let f = Filter::parse(filter).unwrap_or_else(|e| panic!("{filter:?}: {e}"));
        f.matches(&|k| obj.get(k).cloned())
    }

    fn web1() -> BTreeMap<String, String> {
        object(&[
            ("name", "web1"),
            ("status", "Running"),
            ("location", "n1"),
            ("project", "default"),
            ("config.limits.cpu", "2"),
            ("description", "a b"),
        ])
    }

    #[test]
    fn simple_comparisons() {
        let o = web1();
        assert!(matches("name eq web1", &o));
        assert!(!matches("name eq web2", &o));
        assert!(matches("name ne web2", &o));
        assert!(!matches("name ne web1", &o));
        assert!(matches("location eq n1", &o));
        assert!(matches("project eq default", &o));
        assert!(matches("config.limits.cpu eq 2", &o));
        assert!(!matches("config.limits.memory eq 2", &o));
    }

    #[test]
    fn status_ignores_case_other_fields_do_not() {
        let o = web1();
        assert!(matches("status eq running", &o));
        assert!(matches("status eq RUNNING", &o));
        assert!(!matches("status ne running", &o));
        assert!(!matches("name eq WEB1", &o));
    }

    #[test]
    fn keywords_and_operators_ignore_case() {
        let o = web1();
        assert!(matches("name EQ web1 AND NOT location Ne n1", &o));
        assert!(matches("name eq x OR name eq web1", &o));
    }

    #[test]
    fn quoted_values() {
        let o = web1();
        assert!(matches("description eq \"a b\"", &o));
        assert!(matches("description eq 'a b'", &o));
        assert!(!matches("description eq a", &o));
        let q = object(&[("description", "say \"hi\"")]);
        assert!(matches(r#"description eq "say \"hi\"""#, &q));
        assert!(matches("name eq \"\"", &object(&[])));
        // A quoted keyword is a value.
        assert!(matches("name eq \"and\"", &object(&[("name", "and")])));
    }

    #[test]
    fn missing_fields_compare_as_empty() {
        let o = web1();
        assert!(matches("config.user.x ne 1", &o));
        assert!(matches("config.user.x eq ''", &o));
    }

    #[test]
    fn precedence_not_and_or() {
        // a or b and c == a or (b and c)
        let a_true = object(&[("a", "1"), ("b", "0"), ("c", "0")]);
        assert!(matches("a eq 1 or b eq 1 and c eq 1", &a_true));
        // (a or b) and c would be false here.
        assert!(!matches("(a eq 1 or b eq 1) and c eq 1", &a_true));
        // not binds tighter than and: not a and b == (not a) and b
        let o = object(&[("a", "1"), ("b", "1")]);
        assert!(!matches("not a eq 1 and b eq 1", &o));
        assert!(matches("not (a eq 1 and b eq 2)", &o));
        assert!(matches("not not a eq 1", &o));
        // and binds tighter than or on the left too: a and b or c == (a and b) or c
        let c_only = object(&[("a", "0"), ("b", "0"), ("c", "1")]);
        assert!(matches("a eq 1 and b eq 1 or c eq 1", &c_only));
        assert!(!matches("a eq 1 and (b eq 1 or c eq 1)", &c_only));
    }

    #[test]
    fn parse_tree_shape() {
        let f = Filter::parse("a eq 1 or b eq 2 and not c ne 3").unwrap();
        assert_eq!(
            f.expr(),
            &Expr::Or(
                Box::new(Expr::Eq("a".into(), "1".into())),
                Box::new(Expr::And(
                    Box::new(Expr::Eq("b".into(), "2".into())),
                    Box::new(Expr::Not(Box::new(Expr::Ne("c".into(), "3".into())))),
                )),
            )
        );
    }

    #[test]
    fn parentheses_without_spaces() {
        let o = web1();
        assert!(matches("(name eq web1)and(status eq running)", &o));
        assert!(matches("((name eq web1))", &o));
    }

    #[test]
    fn errors_name_the_position() {
        let cases = [
            ("", "empty"),
            ("   ", "empty"),
            ("name", "position 5"),
            ("name is web1", "position 6"),
            ("name eq", "position 8"),
            ("name eq web1 and", "position 17"),
            ("name eq web1 web2", "position 14"),
            ("(name eq web1", "position 1"),
            ("name eq web1)", "position 13"),
            ("name eq \"web1", "position 9"),
            ("and eq x", "position 1"),
            ("name eq (", "position 9"),
            (")", "position 1"),
            ("name eq web1 or or", "position 17"),
        ];
        for (filter, want) in cases {
            let e = Filter::parse(filter).expect_err(filter);
            assert!(e.contains(want), "{filter:?}: {e}");
            assert!(!e.ends_with('.'), "{e}");
        }
    }

    #[test]
    fn api_objects_as_json() {
        let inst = serde_json::json!({
            "name": "web1",
            "status": "Running",
            "location": "n1",
            "project": "p",
            "config": {"limits.cpu": "1"},
            "expanded_config": {"limits.cpu": "2", "limits.memory": "1GiB"},
            "profiles": ["default", "web"],
            "ephemeral": false,
            "state": {"pid": 7},
        });
        let m = |f: &str| Filter::parse(f).unwrap().matches_json(&inst);
        assert!(m(
            "name eq web1 and status eq running and location eq n1 and project eq p"
        ));
        assert!(m("config.limits.cpu eq 2"), "the effective config");
        assert!(m("config.limits.memory eq 1GiB"));
        assert!(m("expanded_config.limits.cpu eq 2"));
        assert!(m("profiles eq default,web"));
        assert!(m("ephemeral eq false"));
        assert!(m("state ne x"), "objects compare as missing");
        assert!(m("config.nope eq ''"));
        let image = serde_json::json!({"properties": {"os": "debian"}, "size": 10});
        let f = Filter::parse("properties.os eq debian and size eq 10").unwrap();
        assert!(f.matches_json(&image));
        let profile = serde_json::json!({"name": "p", "config": {"limits.cpu": "4"}});
        assert!(
            Filter::parse("config.limits.cpu eq 4")
                .unwrap()
                .matches_json(&profile)
        );
    }

    #[test]
    fn hostile_input_does_not_overflow() {
        let deep = format!("{}name eq x{}", "(".repeat(10_000), ")".repeat(10_000));
        assert!(Filter::parse(&deep).is_err());
        let nots = format!("{}name eq x", "not ".repeat(500));
        assert!(Filter::parse(&nots).unwrap_err().contains("levels deep"));
        let ok = format!("{}name eq x{}", "(".repeat(20), ")".repeat(20));
        assert!(Filter::parse(&ok).is_ok());
        assert!(Filter::parse(&"a eq b or ".repeat(1000)).is_err());
        assert!(Filter::parse("name eq \u{1F600}").is_ok());
        assert!(Filter::parse("\\").is_err());
    }
}
