//! `${{ ... }}` templates and the small expression language inside them.
//!
//! ```text
//! expr    := or
//! or      := and ('||' and)*
//! and     := cmp ('&&' cmp)*
//! cmp     := unary (('==' | '!=') unary)?
//! unary   := '!' unary | primary
//! primary := '(' expr ')' | 'string' | "string" | number | true | false | null | path
//! path    := ident ('.' ident | '[' digits ']')*        ident: [A-Za-z0-9_-]+
//! ```
//! `(` and `!` nest at most [`MAX_DEPTH`] levels deep, and `&&`/`||` chains
//! are flat lists, so no expression, however long, makes parsing, evaluating
//! or dropping it recurse deeper than that.
//!
//! Roots: `params.NAME`, `steps.ID.outputs.NAME`, `each.value`, `each.index`,
//! `run.id`, `run.mode`. A string that is exactly one `${{ expr }}` takes the
//! expression's value (a list stays a list); anywhere else it is interpolated.

use serde_json::Value;
use std::fmt;

/// How deeply `(` and `!` may nest in one expression.
pub const MAX_DEPTH: usize = 64;

/// One segment of a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

impl fmt::Display for Seg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Seg::Key(k) => f.write_str(k),
            Seg::Index(i) => write!(f, "[{i}]"),
        }
    }
}

/// A parsed expression.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Lit(Value),
    Path(Vec<Seg>),
    Not(Box<Expr>),
    Eq(Box<Expr>, Box<Expr>, bool),
    /// Two or more operands, so a long chain stays one level deep.
    And(Vec<Expr>),
    /// Two or more operands.
    Or(Vec<Expr>),
}

/// A path as written (`steps.db.outputs.addr`).
pub fn path_text(path: &[Seg]) -> String {
    let mut s = String::new();
    for (i, seg) in path.iter().enumerate() {
        if i > 0 && matches!(seg, Seg::Key(_)) {
            s.push('.');
        }
        s.push_str(&seg.to_string());
    }
    s
}

/// Where a template's values come from.
pub trait Scope {
    /// The value at `path` (root first), or `None` if there is none.
    fn get(&self, path: &[Seg]) -> Option<Value>;
}

impl Expr {
    /// Every path the expression reads.
    pub fn paths<'a>(&'a self, out: &mut Vec<&'a [Seg]>) {
        match self {
            Expr::Lit(_) => {}
            Expr::Path(p) => out.push(p),
            Expr::Not(e) => e.paths(out),
            Expr::Eq(a, b, _) => {
                a.paths(out);
                b.paths(out);
            }
            Expr::And(all) | Expr::Or(all) => all.iter().for_each(|e| e.paths(out)),
        }
    }

    pub fn eval(&self, scope: &dyn Scope) -> Result<Value, String> {
        Ok(match self {
            Expr::Lit(v) => v.clone(),
            Expr::Path(p) => scope
                .get(p)
                .ok_or_else(|| format!("`{}` has no value", path_text(p)))?,
            Expr::Not(e) => Value::Bool(!truthy(&e.eval(scope)?)),
            Expr::Eq(a, b, negate) => {
                let (a, b) = (a.eval(scope)?, b.eval(scope)?);
                Value::Bool(loose_eq(&a, &b) != *negate)
            }
            Expr::And(all) => {
                for e in all {
                    if !truthy(&e.eval(scope)?) {
                        return Ok(Value::Bool(false));
                    }
                }
                Value::Bool(true)
            }
            Expr::Or(all) => {
                for e in all {
                    if truthy(&e.eval(scope)?) {
                        return Ok(Value::Bool(true));
                    }
                }
                Value::Bool(false)
            }
        })
    }
}

/// `false`, `null`, `""`, `"false"`, `0` and `[]` are false; everything else is true.
pub fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !(s.is_empty() || s == "false"),
        Value::Array(a) => !a.is_empty(),
        Value::Object(_) => true,
    }
}

/// Equality that compares a number with its decimal string (YAML and the
/// command line give strings).
fn loose_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(_), Value::String(s)) | (Value::String(s), Value::Number(_)) => {
            let n = if let Value::Number(n) = a {
                n
            } else if let Value::Number(n) = b {
                n
            } else {
                return false;
            };
            s.parse::<f64>().ok() == n.as_f64()
        }
        (Value::Bool(x), Value::String(s)) | (Value::String(s), Value::Bool(x)) => {
            s == &x.to_string()
        }
        _ => a == b,
    }
}

/// Text as a string for interpolation.
pub fn to_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// One piece of a string with templates.
#[derive(Clone, Debug, PartialEq)]
pub enum Part {
    Text(String),
    Expr(Expr),
}

/// Splits a string into text and `${{ expr }}` parts. `Err` names the problem
/// and its byte offset in the string.
pub fn parse_template(s: &str) -> Result<Vec<Part>, (usize, String)> {
    let mut parts = Vec::new();
    let mut rest = s;
    let mut offset = 0;
    while let Some(i) = rest.find("${{") {
        if i > 0 {
            parts.push(Part::Text(rest[..i].to_owned()));
        }
        let body_start = i + 3;
        let Some(end) = rest[body_start..].find("}}") else {
            return Err((offset + i, "`${{` without a closing `}}`".into()));
        };
        let body = &rest[body_start..body_start + end];
        let expr = parse_expr(body).map_err(|(at, m)| (offset + body_start + at, m))?;
        parts.push(Part::Expr(expr));
        let consumed = body_start + end + 2;
        offset += consumed;
        rest = &rest[consumed..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_owned()));
    }
    Ok(parts)
}

/// Renders parts: a lone expression keeps its type, anything else is a string.
pub fn render_parts(parts: &[Part], scope: &dyn Scope) -> Result<Value, String> {
    if let [Part::Expr(e)] = parts {
        return e.eval(scope);
    }
    let mut out = String::new();
    for p in parts {
        match p {
            Part::Text(t) => out.push_str(t),
            Part::Expr(e) => out.push_str(&to_text(&e.eval(scope)?)),
        }
    }
    Ok(Value::String(out))
}

/// Renders every string inside a JSON value.
pub fn render(v: &Value, scope: &dyn Scope) -> Result<Value, String> {
    Ok(match v {
        Value::String(s) if s.contains("${{") => {
            let parts = parse_template(s).map_err(|(_, m)| m)?;
            render_parts(&parts, scope)?
        }
        Value::Array(a) => Value::Array(
            a.iter()
                .map(|x| render(x, scope))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| Ok((k.clone(), render(x, scope)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

/// Every expression inside the strings of a JSON value.
pub fn exprs_in(v: &Value) -> Vec<Expr> {
    let mut out = Vec::new();
    collect(v, &mut out);
    out
}

fn collect(v: &Value, out: &mut Vec<Expr>) {
    match v {
        Value::String(s) if s.contains("${{") => {
            if let Ok(parts) = parse_template(s) {
                out.extend(parts.into_iter().filter_map(|p| match p {
                    Part::Expr(e) => Some(e),
                    Part::Text(_) => None,
                }));
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect(x, out)),
        Value::Object(o) => o.values().for_each(|x| collect(x, out)),
        _ => {}
    }
}

/// Parses the inside of `${{ ... }}`.
pub fn parse_expr(s: &str) -> Result<Expr, (usize, String)> {
    let mut p = Parser {
        s: s.as_bytes(),
        at: 0,
        depth: 0,
    };
    let e = p.or()?;
    p.ws();
    if p.at < p.s.len() {
        return Err((p.at, format!("unexpected `{}`", &s[p.at..])));
    }
    Ok(e)
}

struct Parser<'a> {
    s: &'a [u8],
    at: usize,
    /// `(` and `!` open around the current position.
    depth: usize,
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'-'
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.at < self.s.len() && self.s[self.at].is_ascii_whitespace() {
            self.at += 1;
        }
    }

    fn eat(&mut self, tok: &str) -> bool {
        self.ws();
        if self.s[self.at..].starts_with(tok.as_bytes()) {
            self.at += tok.len();
            true
        } else {
            false
        }
    }

    /// One level deeper, or an error before the parser recurses.
    fn enter(&mut self, at: usize) -> Result<(), (usize, String)> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err((
                at,
                format!("nesting deeper than {MAX_DEPTH} levels of `(` and `!`"),
            ));
        }
        Ok(())
    }

    fn or(&mut self) -> Result<Expr, (usize, String)> {
        let mut all = vec![self.and()?];
        while self.eat("||") {
            all.push(self.and()?);
        }
        Ok(if all.len() == 1 {
            all.remove(0)
        } else {
            Expr::Or(all)
        })
    }

    fn and(&mut self) -> Result<Expr, (usize, String)> {
        let mut all = vec![self.cmp()?];
        while self.eat("&&") {
            all.push(self.cmp()?);
        }
        Ok(if all.len() == 1 {
            all.remove(0)
        } else {
            Expr::And(all)
        })
    }

    fn cmp(&mut self) -> Result<Expr, (usize, String)> {
        let e = self.unary()?;
        for (tok, negate) in [("==", false), ("!=", true)] {
            if self.eat(tok) {
                return Ok(Expr::Eq(Box::new(e), Box::new(self.unary()?), negate));
            }
        }
        Ok(e)
    }

    fn unary(&mut self) -> Result<Expr, (usize, String)> {
        self.ws();
        let start = self.at;
        if self.eat("!") {
            self.enter(start)?;
            let e = self.unary()?;
            self.depth -= 1;
            return Ok(Expr::Not(Box::new(e)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr, (usize, String)> {
        self.ws();
        let start = self.at;
        let Some(&c) = self.s.get(self.at) else {
            return Err((self.at, "expected an expression".into()));
        };
        if c == b'(' {
            self.at += 1;
            self.enter(start)?;
            let e = self.or()?;
            self.depth -= 1;
            if !self.eat(")") {
                return Err((self.at, "expected `)`".into()));
            }
            return Ok(e);
        }
        if c == b'\'' || c == b'"' {
            let end = self.s[start + 1..]
                .iter()
                .position(|&x| x == c)
                .ok_or((start, "unterminated string".to_owned()))?;
            self.at = start + 1 + end + 1;
            let text = String::from_utf8_lossy(&self.s[start + 1..start + 1 + end]).into_owned();
            return Ok(Expr::Lit(Value::String(text)));
        }
        if c.is_ascii_digit() {
            while self.at < self.s.len()
                && (self.s[self.at].is_ascii_digit() || self.s[self.at] == b'.')
            {
                self.at += 1;
            }
            let text = std::str::from_utf8(&self.s[start..self.at]).unwrap_or("");
            return serde_json::from_str::<Value>(text)
                .map(Expr::Lit)
                .map_err(|_| (start, format!("bad number `{text}`")));
        }
        let mut path = Vec::new();
        loop {
            let s = self.at;
            while self.at < self.s.len() && is_ident(self.s[self.at]) {
                self.at += 1;
            }
            if s == self.at {
                return Err((self.at, "expected a name".into()));
            }
            path.push(Seg::Key(
                String::from_utf8_lossy(&self.s[s..self.at]).into_owned(),
            ));
            loop {
                if self.s.get(self.at) == Some(&b'[') {
                    let s = self.at + 1;
                    let len = self.s[s..]
                        .iter()
                        .take_while(|c| c.is_ascii_digit())
                        .count();
                    if len == 0 || self.s.get(s + len) != Some(&b']') {
                        return Err((self.at, "expected `[NUMBER]`".into()));
                    }
                    let n = std::str::from_utf8(&self.s[s..s + len])
                        .unwrap_or("0")
                        .parse()
                        .unwrap_or(0);
                    path.push(Seg::Index(n));
                    self.at = s + len + 1;
                } else {
                    break;
                }
            }
            if self.s.get(self.at) == Some(&b'.') {
                self.at += 1;
            } else {
                break;
            }
        }
        if let [Seg::Key(k)] = path.as_slice() {
            match k.as_str() {
                "true" => return Ok(Expr::Lit(Value::Bool(true))),
                "false" => return Ok(Expr::Lit(Value::Bool(false))),
                "null" => return Ok(Expr::Lit(Value::Null)),
                _ => {}
            }
        }
        Ok(Expr::Path(path))
    }
}

/// Looks a path up inside a JSON value.
pub fn walk<'a>(mut v: &'a Value, path: &[Seg]) -> Option<&'a Value> {
    for seg in path {
        v = match seg {
            Seg::Key(k) => v.get(k.as_str())?,
            Seg::Index(i) => v.get(*i)?,
        };
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct J(Value);
    impl Scope for J {
        fn get(&self, path: &[Seg]) -> Option<Value> {
            walk(&self.0, path).cloned()
        }
    }

    #[test]
    fn renders_lone_expressions_with_their_type_and_interpolates_text() {
        let scope = J(
            json!({"params": {"n": 3, "name": "web"}, "steps": {"d": {"outputs": {"list": [1, 2]}}}}),
        );
        assert_eq!(render(&json!("${{ params.n }}"), &scope), Ok(json!(3)));
        assert_eq!(
            render(&json!("${{steps.d.outputs.list}}"), &scope),
            Ok(json!([1, 2]))
        );
        assert_eq!(
            render(&json!("${{ steps.d.outputs.list[1] }}"), &scope),
            Ok(json!(2))
        );
        assert_eq!(
            render(&json!("vm-${{ params.name }}-${{ params.n }}"), &scope),
            Ok(json!("vm-web-3"))
        );
        assert_eq!(
            render(&json!({"a": ["x ${{ params.name }}"]}), &scope),
            Ok(json!({"a": ["x web"]}))
        );
        assert!(
            render(&json!("${{ params.missing }}"), &scope)
                .unwrap_err()
                .contains("params.missing")
        );
    }

    #[test]
    fn evaluates_conditions() {
        let scope = J(json!({"params": {"mode": "drill", "n": 0, "on": "true"}}));
        let t = |s: &str| truthy(&parse_expr(s).unwrap().eval(&scope).unwrap());
        assert!(t("params.mode == 'drill'"));
        assert!(t("params.mode != \"run\" && !params.n"));
        assert!(t("params.n == 0 || false"));
        assert!(t("params.on == true"));
        assert!(!t("(params.mode == 'run') || params.n"));
    }

    #[test]
    fn nesting_is_bounded_and_chains_are_flat() {
        let deep = format!("{}true", "!".repeat(MAX_DEPTH + 1));
        let (at, msg) = parse_expr(&deep).unwrap_err();
        assert!(msg.contains("nesting deeper than 64 levels"), "{msg}");
        assert_eq!(at, MAX_DEPTH);
        let parens = format!(
            "{}true{}",
            "(".repeat(MAX_DEPTH + 1),
            ")".repeat(MAX_DEPTH + 1)
        );
        assert!(parse_expr(&parens).is_err());
        let ok = format!("{}true", "!".repeat(MAX_DEPTH));
        assert_eq!(
            parse_expr(&ok).unwrap().eval(&J(json!({}))),
            Ok(json!(true))
        );
        // 10,000 operands: one level, short-circuiting.
        let chain = vec!["false"; 10_000].join(" || ") + " || params.x";
        let e = parse_expr(&chain).unwrap();
        assert!(matches!(&e, Expr::Or(all) if all.len() == 10_001));
        let scope = J(json!({"params": {"x": 1}}));
        assert_eq!(e.eval(&scope), Ok(json!(true)));
        let and = parse_expr("true && params.missing && true").unwrap();
        assert!(and.eval(&scope).is_err());
        assert_eq!(
            parse_expr("false && params.missing").unwrap().eval(&scope),
            Ok(json!(false))
        );
    }

    #[test]
    fn reports_syntax_errors_with_offsets() {
        assert_eq!(parse_expr("params.").unwrap_err().0, 7);
        assert!(
            parse_expr("a == 'x")
                .unwrap_err()
                .1
                .contains("unterminated")
        );
        assert!(
            parse_template("x ${{ params.a")
                .unwrap_err()
                .1
                .contains("closing")
        );
        assert_eq!(parse_template("ab ${{ a b }}").unwrap_err().0, 9);
    }
}
