package api

import (
	"fmt"
	"sort"
	"strings"
)

// Selector is a parsed label selector, Calico's small language:
//
//	all()  k == 'v'  k != 'v'  has(k)  !has(k)  k in {'a','b'}  k not in {'a'}
//	a && b  a || b  !a  (a)
//
// && binds tighter than ||. The empty string selects everything.
type Selector interface {
	Matches(labels map[string]string) bool
	String() string
}

// ParseSelector parses s. Errors give the position of the problem.
func ParseSelector(s string) (Selector, error) {
	p := &selParser{src: s}
	p.next()
	if p.tok.kind == tokEOF {
		return allSel{}, nil
	}
	sel, err := p.parseOrDepth(0)
	if err != nil {
		return nil, err
	}
	if p.tok.kind != tokEOF {
		return nil, p.errorf("unexpected %s", p.tok)
	}
	return sel, nil
}

type (
	allSel struct{}
	hasSel struct{ key string }
	eqSel  struct {
		key, val string
		neg      bool
	}
	inSel struct {
		key  string
		vals []string
		neg  bool
	}
	notSel struct{ x Selector }
	andSel struct{ l, r Selector }
	orSel  struct{ l, r Selector }
)

func (allSel) Matches(map[string]string) bool { return true }
func (allSel) String() string                 { return "all()" }

func (s hasSel) Matches(l map[string]string) bool { _, ok := l[s.key]; return ok }
func (s hasSel) String() string                   { return "has(" + s.key + ")" }

func (s eqSel) Matches(l map[string]string) bool {
	v, ok := l[s.key]
	if s.neg {
		return !ok || v != s.val
	}
	return ok && v == s.val
}
func (s eqSel) String() string {
	op := "=="
	if s.neg {
		op = "!="
	}
	return fmt.Sprintf("%s %s %s", s.key, op, quote(s.val))
}

func (s inSel) Matches(l map[string]string) bool {
	v, ok := l[s.key]
	found := false
	if ok {
		for _, x := range s.vals {
			if x == v {
				found = true
				break
			}
		}
	}
	return found != s.neg
}
func (s inSel) String() string {
	q := make([]string, len(s.vals))
	for i, v := range s.vals {
		q[i] = quote(v)
	}
	op := "in"
	if s.neg {
		op = "not in"
	}
	return fmt.Sprintf("%s %s {%s}", s.key, op, strings.Join(q, ", "))
}

func (s notSel) Matches(l map[string]string) bool { return !s.x.Matches(l) }
func (s notSel) String() string                   { return "!" + paren(s.x) }

func (s andSel) Matches(l map[string]string) bool { return s.l.Matches(l) && s.r.Matches(l) }
func (s andSel) String() string {
	l := s.l.String() // a chain a && b && c nests on the left: print it flat
	if _, ok := s.l.(andSel); !ok {
		l = paren(s.l)
	}
	return l + " && " + paren(s.r)
}

func (s orSel) Matches(l map[string]string) bool { return s.l.Matches(l) || s.r.Matches(l) }
func (s orSel) String() string                   { return s.l.String() + " || " + s.r.String() }

func paren(s Selector) string {
	switch s.(type) {
	case andSel, orSel:
		return "(" + s.String() + ")"
	}
	return s.String()
}

func quote(v string) string {
	if strings.Contains(v, "'") {
		return `"` + v + `"`
	}
	return "'" + v + "'"
}

type tokKind int

const (
	tokEOF tokKind = iota
	tokIdent
	tokString
	tokEq
	tokNe
	tokAnd
	tokOr
	tokNot
	tokLParen
	tokRParen
	tokLBrace
	tokRBrace
	tokComma
	tokBad
)

type token struct {
	kind tokKind
	text string
	pos  int
}

func (t token) String() string {
	switch t.kind {
	case tokEOF:
		return "end of selector"
	case tokString:
		return fmt.Sprintf("string %q", t.text)
	}
	return fmt.Sprintf("%q", t.text)
}

type selParser struct {
	src string
	pos int
	tok token
}

func (p *selParser) errorf(format string, args ...any) error {
	return fmt.Errorf("selector %q, at offset %d: %s", p.src, p.tok.pos, fmt.Sprintf(format, args...))
}

func isIdentByte(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("-_./", c) >= 0
}

func (p *selParser) next() {
	for p.pos < len(p.src) && (p.src[p.pos] == ' ' || p.src[p.pos] == '\t' || p.src[p.pos] == '\n') {
		p.pos++
	}
	start := p.pos
	if p.pos >= len(p.src) {
		p.tok = token{kind: tokEOF, pos: start}
		return
	}
	two := ""
	if p.pos+1 < len(p.src) {
		two = p.src[p.pos : p.pos+2]
	}
	switch two {
	case "==":
		p.pos += 2
		p.tok = token{tokEq, two, start}
		return
	case "!=":
		p.pos += 2
		p.tok = token{tokNe, two, start}
		return
	case "&&":
		p.pos += 2
		p.tok = token{tokAnd, two, start}
		return
	case "||":
		p.pos += 2
		p.tok = token{tokOr, two, start}
		return
	}
	c := p.src[p.pos]
	single := map[byte]tokKind{'!': tokNot, '(': tokLParen, ')': tokRParen, '{': tokLBrace, '}': tokRBrace, ',': tokComma}
	if k, ok := single[c]; ok {
		p.pos++
		p.tok = token{k, string(c), start}
		return
	}
	if c == '\'' || c == '"' {
		end := strings.IndexByte(p.src[p.pos+1:], c)
		if end < 0 {
			p.pos = len(p.src)
			p.tok = token{tokBad, "unterminated string", start}
			return
		}
		p.tok = token{tokString, p.src[p.pos+1 : p.pos+1+end], start}
		p.pos += end + 2
		return
	}
	if isIdentByte(c) {
		for p.pos < len(p.src) && isIdentByte(p.src[p.pos]) {
			p.pos++
		}
		p.tok = token{tokIdent, p.src[start:p.pos], start}
		return
	}
	p.pos++
	p.tok = token{tokBad, string(c), start}
}

// maxDepth bounds nesting so a hostile selector cannot exhaust the stack.
const maxDepth = 64

func (p *selParser) parseUnaryDepth(depth int) (Selector, error) {
	if depth > maxDepth {
		return nil, p.errorf("nested more than %d levels", maxDepth)
	}
	switch p.tok.kind {
	case tokNot:
		p.next()
		x, err := p.parseUnaryDepth(depth + 1)
		if err != nil {
			return nil, err
		}
		return notSel{x}, nil
	case tokLParen:
		p.next()
		x, err := p.parseOrDepth(depth + 1)
		if err != nil {
			return nil, err
		}
		if p.tok.kind != tokRParen {
			return nil, p.errorf("expected ')', found %s", p.tok)
		}
		p.next()
		return x, nil
	case tokIdent:
		return p.parseTerm()
	case tokBad:
		return nil, p.errorf("unexpected %s", p.tok.text)
	}
	return nil, p.errorf("expected a term such as has(k) or k == 'v', found %s", p.tok)
}

func (p *selParser) parseOrDepth(depth int) (Selector, error) {
	if depth > maxDepth {
		return nil, p.errorf("nested more than %d levels", maxDepth)
	}
	l, err := p.parseAndDepth(depth)
	if err != nil {
		return nil, err
	}
	for p.tok.kind == tokOr {
		p.next()
		r, err := p.parseAndDepth(depth)
		if err != nil {
			return nil, err
		}
		l = orSel{l, r}
	}
	return l, nil
}

func (p *selParser) parseAndDepth(depth int) (Selector, error) {
	l, err := p.parseUnaryDepth(depth)
	if err != nil {
		return nil, err
	}
	for p.tok.kind == tokAnd {
		p.next()
		r, err := p.parseUnaryDepth(depth)
		if err != nil {
			return nil, err
		}
		l = andSel{l, r}
	}
	return l, nil
}

func (p *selParser) parseTerm() (Selector, error) {
	id := p.tok
	p.next()
	switch id.text {
	case "all":
		if p.tok.kind == tokLParen {
			p.next()
			if p.tok.kind != tokRParen {
				return nil, p.errorf("all() takes no arguments")
			}
			p.next()
			return allSel{}, nil
		}
	case "has":
		if p.tok.kind == tokLParen {
			p.next()
			if p.tok.kind != tokIdent {
				return nil, p.errorf("has() needs a label key, found %s", p.tok)
			}
			key := p.tok.text
			p.next()
			if p.tok.kind != tokRParen {
				return nil, p.errorf("expected ')' after has(%s, found %s", key, p.tok)
			}
			p.next()
			return hasSel{key}, nil
		}
	}
	key := id.text
	switch p.tok.kind {
	case tokEq, tokNe:
		neg := p.tok.kind == tokNe
		p.next()
		if p.tok.kind != tokString {
			return nil, p.errorf("expected a quoted value after %s %s, found %s", key, map[bool]string{false: "==", true: "!="}[neg], p.tok)
		}
		v := p.tok.text
		p.next()
		return eqSel{key, v, neg}, nil
	case tokIdent:
		neg := false
		if p.tok.text == "not" {
			neg = true
			p.next()
		}
		if p.tok.kind != tokIdent || p.tok.text != "in" {
			return nil, p.errorf("expected ==, !=, in or not in after %q, found %s", key, p.tok)
		}
		p.next()
		vals, err := p.parseSet()
		if err != nil {
			return nil, err
		}
		return inSel{key, vals, neg}, nil
	}
	return nil, p.errorf("expected ==, !=, in or not in after %q, found %s", key, p.tok)
}

func (p *selParser) parseSet() ([]string, error) {
	if p.tok.kind != tokLBrace {
		return nil, p.errorf("expected '{' to start a set, found %s", p.tok)
	}
	p.next()
	var vals []string
	for p.tok.kind != tokRBrace {
		if p.tok.kind != tokString {
			return nil, p.errorf("expected a quoted value in the set, found %s", p.tok)
		}
		vals = append(vals, p.tok.text)
		p.next()
		if p.tok.kind == tokComma {
			p.next()
		} else if p.tok.kind != tokRBrace {
			return nil, p.errorf("expected ',' or '}' in the set, found %s", p.tok)
		}
	}
	p.next()
	sort.Strings(vals)
	return vals, nil
}
