package protocol

import "testing"

func TestCursorRoundTrip(t *testing.T) {
	for _, c := range []Cursor{{"abc", 0}, {"a:b", 42}, {"tok", 18446744073709551615}} {
		got, ok := ParseCursor(c.String())
		if !ok || got != c {
			t.Errorf("ParseCursor(%q) = %+v, %v; want %+v", c.String(), got, ok, c)
		}
	}
	for _, bad := range []string{"", ":1", "tok", "tok:", "tok:-1", "tok:x", "tok:18446744073709551616"} {
		if c, ok := ParseCursor(bad); ok {
			t.Errorf("ParseCursor(%q) = %+v, want not a cursor", bad, c)
		}
	}
}
