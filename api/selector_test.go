package api

import (
	"fmt"
	"strings"
	"testing"
)

// selectorLabelSets are the label maps every selector case is evaluated against;
// a case's want has one '1' or '0' per set, in this order.
var selectorLabelSets = []struct {
	name   string
	labels map[string]string
}{
	{"web", map[string]string{"app": "web", "tier": "frontend", "margay.dev/zone": "a-1", "my.key-x": "v.1", "empty": "", "quote": "it's"}},
	{"db", map[string]string{"app": "db", "tier": "backend", "margay.dev/zone": "b-2", "say": `a"b`}},
	{"keywords", map[string]string{"all": "x", "has": "y", "not": "z", "in": "w"}},
	{"none", nil},
}

var selectorMatchCases = []struct {
	sel  string
	want string // web, db, keywords, none
}{
	{"all()", "1111"},
	{"", "1111"},
	{" \t\n", "1111"},
	{"app == 'web'", "1000"},
	{`app == "web"`, "1000"},
	{"app == 'WEB'", "0000"},
	{"app != 'web'", "0111"},
	{"has(tier)", "1100"},
	{"!has(tier)", "0011"},
	{"app in {'web', 'api'}", "1000"},
	{`app in {"web",'db'}`, "1100"},
	{"app not in {'web', 'api'}", "0111"},
	{"app in {}", "0000"},
	{"app not in {}", "1111"},
	{"app == 'web' && tier == 'frontend'", "1000"},
	{"app == 'web' && tier == 'backend'", "0000"},
	{"app == 'web' || app == 'db'", "1100"},
	{"!(app == 'web')", "0111"},
	{"!app == 'web'", "0111"},
	{"!!has(app)", "1100"},
	{"!all()", "0000"},
	{"all() && app == 'db'", "0100"},
	// && binds tighter than ||: a || (b && c), not (a || b) && c.
	{"has(app) || has(nothing) && has(never)", "1100"},
	{"has(never) && has(nothing) || has(app)", "1100"},
	{"(has(app) || has(nothing)) && has(never)", "0000"},
	{"has(app) && (tier == 'backend' || !has(tier))", "0100"},
	{"!has(app) || app == 'db'", "0111"},
	{"!(has(app) && tier == 'frontend') || has(say)", "0111"},
	{"((app == 'db'))", "0100"},
	{"has(a) || has(b) || has(tier) || has(c)", "1100"},
	{"has(app) && has(tier) && has(say)", "0100"},
	// Keys with '/', '.', '-'; values with '.', '-'.
	{"margay.dev/zone == 'a-1'", "1000"},
	{"margay.dev/zone in {'a-1', 'b-2'}", "1100"},
	{"has(margay.dev/zone)", "1100"},
	{"my.key-x == 'v.1'", "1000"},
	{"has(my.key-x)", "1000"},
	// Empty values are values.
	{"empty == ''", "1000"},
	{"empty != ''", "0111"},
	{"has(empty)", "1000"},
	// Each quote style can hold the other quote.
	{`quote == "it's"`, "1000"},
	{`say == 'a"b'`, "0100"},
	{`say in {'a"b', "it's"}`, "0100"},
	// Whitespace is optional between tokens and may include tabs and newlines.
	{"  app=='web'&&tier=='frontend'  ", "1000"},
	{"app == 'web'\n\t&& has(tier)", "1000"},
	// Words of the language are still usable as label keys.
	{"all == 'x'", "0010"},
	{"has == 'y'", "0010"},
	{"has(has)", "0010"},
	{"in in {'w'}", "0010"},
	{"not not in {'z'}", "1101"},
}

func checkMatches(t *testing.T, sel Selector, want string) {
	t.Helper()
	for i, ls := range selectorLabelSets {
		if got := sel.Matches(ls.labels); got != (want[i] == '1') {
			t.Errorf("%q (String %q) on %s %v = %v, want %v", sel, sel.String(), ls.name, ls.labels, got, !got)
		}
	}
}

func TestSelectorMatches(t *testing.T) {
	for _, tt := range selectorMatchCases {
		t.Run(tt.sel, func(t *testing.T) {
			sel, err := ParseSelector(tt.sel)
			if err != nil {
				t.Fatalf("ParseSelector(%q): %v", tt.sel, err)
			}
			checkMatches(t, sel, tt.want)
		})
	}
}

// String() is a selector that parses back to one that matches the same way, and
// printing that again gives the same text.
func TestSelectorStringRoundTrip(t *testing.T) {
	for _, tt := range selectorMatchCases {
		t.Run(tt.sel, func(t *testing.T) {
			sel, err := ParseSelector(tt.sel)
			if err != nil {
				t.Fatalf("ParseSelector(%q): %v", tt.sel, err)
			}
			again, err := ParseSelector(sel.String())
			if err != nil {
				t.Fatalf("ParseSelector(String() = %q): %v", sel.String(), err)
			}
			checkMatches(t, again, tt.want)
			if again.String() != sel.String() {
				t.Errorf("String() not stable: %q then %q", sel.String(), again.String())
			}
		})
	}
}

func TestSelectorString(t *testing.T) {
	tests := []struct{ in, want string }{
		{"", "all()"},
		{"all()", "all()"},
		{"has( a )", "has(a)"},
		{"a=='b'", "a == 'b'"},
		{`a != "b"`, "a != 'b'"},
		{`a == "it's"`, `a == "it's"`},
		{"a in {'z','b', 'a'}", "a in {'a', 'b', 'z'}"},
		{"a not in {}", "a not in {}"},
		{"!(has(a) || has(b))", "!(has(a) || has(b))"},
		{"(has(a) || has(b)) && has(c)", "(has(a) || has(b)) && has(c)"},
		{"has(a) || has(b) && has(c)", "has(a) || has(b) && has(c)"},
		{"!!has(a)", "!!has(a)"},
	}
	for _, tt := range tests {
		sel, err := ParseSelector(tt.in)
		if err != nil {
			t.Errorf("ParseSelector(%q): %v", tt.in, err)
			continue
		}
		if got := sel.String(); got != tt.want {
			t.Errorf("ParseSelector(%q).String() = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestSelectorErrors(t *testing.T) {
	deep := func(open, close string, n int) string {
		return strings.Repeat(open, n) + "has(a)" + strings.Repeat(close, n)
	}
	tests := []struct {
		name   string
		sel    string
		offset int // -1: do not check the offset
		frag   string
	}{
		{"unterminated single quote", "a == 'b", 5, `found "unterminated string"`},
		{"unterminated double quote", `a == "b`, 5, "unterminated string"},
		{"unterminated in set", "a in {'x', 'y}", 11, "unterminated string"},
		{"missing value", "a ==", 4, "expected a quoted value after a ==, found end of selector"},
		{"unquoted value", "a != b", 5, `expected a quoted value after a !=, found "b"`},
		{"single =", "k = 'v'", 2, `expected ==, !=, in or not in after "k", found "="`},
		{"bare key", "a", 1, `after "a", found end of selector`},
		{"trailing word", "a == 'b' c", 9, `unexpected "c"`},
		{"trailing symbol", "a == 'b' @", 9, `unexpected "@"`},
		{"trailing string", "has(a) 'x'", 7, `unexpected string "x"`},
		{"unbalanced close", "a == 'b')", 8, `unexpected ")"`},
		{"unbalanced open", "(a == 'b'", 9, "expected ')', found end of selector"},
		{"unbalanced nested", "((has(a))", 9, "expected ')'"},
		{"has unclosed", "has(a", 5, "expected ')' after has(a, found end of selector"},
		{"has empty", "has()", 4, `has() needs a label key, found ")"`},
		{"has quoted", "has('a')", 4, "has() needs a label key"},
		{"all with argument", "all(x)", 4, "all() takes no arguments"},
		{"in without set", "a in 'x'", 5, "expected '{' to start a set"},
		{"set missing comma", "a in {'x' 'y'}", 10, "expected ',' or '}' in the set"},
		{"set unquoted", "a in {x}", 6, "expected a quoted value in the set"},
		{"set unclosed", "a in {'x'", 9, "expected ',' or '}' in the set, found end of selector"},
		{"not without in", "a not 'x'", 6, "expected ==, !=, in or not in"},
		{"leading and", "&& a == 'b'", 0, "expected a term such as has(k) or k == 'v'"},
		{"dangling and", "a == 'b' &&", 11, "expected a term"},
		{"triple bar", "a == 'b' ||| c == 'd'", 11, `unexpected |`},
		{"lone not", "!", 1, "expected a term"},
		{"empty parens", "()", 1, `expected a term such as has(k) or k == 'v', found ")"`},
		{"carriage return", "has(a)\r", 6, "unexpected"},
		{"parens 65 deep", deep("(", ")", 65), -1, "nested more than 64 levels"},
		{"nots 65 deep", strings.Repeat("!", 65) + "has(a)", -1, "nested more than 64 levels"},
		{"parens 100000 deep", deep("(", ")", 100000), -1, "nested more than 64 levels"},
		{"nots 100000 deep", strings.Repeat("!", 100000) + "has(a)", -1, "nested more than 64 levels"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sel, err := ParseSelector(tt.sel)
			if err == nil {
				t.Fatalf("ParseSelector(%q) = %q, want an error", tt.sel, sel)
			}
			msg := err.Error()
			if !strings.Contains(msg, "at offset ") {
				t.Errorf("error %q does not give an offset", msg)
			}
			if tt.offset >= 0 && !strings.Contains(msg, fmt.Sprintf("at offset %d:", tt.offset)) {
				t.Errorf("error %q, want offset %d", msg, tt.offset)
			}
			if !strings.Contains(msg, tt.frag) {
				t.Errorf("error %q does not contain %q", msg, tt.frag)
			}
		})
	}
}

func TestSelectorDepthLimit(t *testing.T) {
	for _, sel := range []string{
		strings.Repeat("(", 64) + "has(a)" + strings.Repeat(")", 64),
		strings.Repeat("!", 64) + "has(a)",
	} {
		s, err := ParseSelector(sel)
		if err != nil {
			t.Errorf("ParseSelector(%d bytes at the limit): %v", len(sel), err)
			continue
		}
		if _, err := ParseSelector(s.String()); err != nil {
			t.Errorf("ParseSelector(String()) at the limit: %v", err)
		}
	}
}

// A long flat chain of && has no nesting, but String() parenthesises every left
// operand, so the printed form nests one level per term and stops parsing.
func TestSelectorStringLongAndChain(t *testing.T) {
	var terms []string
	for i := 0; i < 70; i++ {
		terms = append(terms, fmt.Sprintf("has(k%d)", i))
	}
	sel, err := ParseSelector(strings.Join(terms, " && "))
	if err != nil {
		t.Fatalf("ParseSelector(70-term chain): %v", err)
	}
	_, err = ParseSelector(sel.String())
	expect(t, err == nil,
		"selector.go andSel.String/paren: a 70-term && chain parses, but its String() nests 68 parentheses and fails to parse: %v", err)
}
