package duplex

import "encoding/json"

// maxPlainDepth bounds the nesting of the data a plain publish may carry.
// encoding/json refuses a body nested deeper than 10000 levels, counting
// the publish object around the data; data nested anywhere near that deep
// is left to json.Unmarshal, which then gives its own answer.
const maxPlainDepth = 1000

// decodePlainPublish decodes a single publish written the way publishers
// write it, without the reflection and the second scan of json.Unmarshal:
// one JSON object, trimmed of surrounding space, whose keys are distinct
// names among channel, user, session, id, data, except and close, written
// without escapes; whose string values are printable ASCII without escapes
// (close may also be null); and whose data is any JSON value. The data is
// the only part checked by encoding/json (json.Valid); the rest is simple
// enough to read here.
//
// On such a body it fills m exactly as json.Unmarshal would and reports
// true; m.Data is then the data's bytes as written, within body. For any
// other body it reports false and leaves m alone: the caller decodes the
// body with json.Unmarshal, so anything unusual, including every invalid
// body and its error text, keeps json.Unmarshal's answer.
func decodePlainPublish(body []byte, m *publishMsg) bool {
	if len(body) < 2 || body[0] != '{' {
		return false
	}
	var p publishMsg
	var seen uint8 // one bit per key, to leave a repeated key to json.Unmarshal
	i := skipJSONSpace(body, 1)
	if i < len(body) && body[i] == '}' {
		if i+1 != len(body) {
			return false
		}
		*m = p
		return true
	}
	for {
		key, next, ok := plainString(body, i)
		if !ok {
			return false
		}
		var bit uint8
		var field *string
		switch string(key) {
		case "channel":
			bit, field = 1<<0, &p.Channel
		case "user":
			bit, field = 1<<1, &p.User
		case "session":
			bit, field = 1<<2, &p.Session
		case "id":
			bit, field = 1<<3, &p.ID
		case "except":
			bit, field = 1<<4, &p.Except
		case "data":
			bit = 1 << 5
		case "close":
			bit = 1 << 6
		default:
			return false // unknown, or a name json.Unmarshal would match by case folding
		}
		if seen&bit != 0 {
			return false
		}
		seen |= bit
		i = skipJSONSpace(body, next)
		if i >= len(body) || body[i] != ':' {
			return false
		}
		i = skipJSONSpace(body, i+1)
		switch {
		case field != nil:
			// A string field: a null or a value of another type is left
			// to json.Unmarshal.
			s, next, ok := plainString(body, i)
			if !ok {
				return false
			}
			*field, i = string(s), next
		case bit == 1<<5: // data
			end, ok := jsonValueEnd(body, i)
			if !ok || !json.Valid(body[i:end]) {
				return false
			}
			p.Data, i = body[i:end:end], end
		default: // close
			if end := i + len("null"); end <= len(body) && string(body[i:end]) == "null" {
				// json.Unmarshal leaves the pointer nil, as it was.
				i = end
				break
			}
			s, next, ok := plainString(body, i)
			if !ok {
				return false
			}
			reason := string(s)
			p.Close, i = &reason, next
		}
		i = skipJSONSpace(body, i)
		if i >= len(body) {
			return false
		}
		switch body[i] {
		case ',':
			i = skipJSONSpace(body, i+1)
		case '}':
			if i+1 != len(body) {
				return false
			}
			*m = p
			return true
		default:
			return false
		}
	}
}

// plainString reads the JSON string at body[i] when its contents are
// printable ASCII without escapes, so that they are the decoded string
// itself. It returns the contents and the index past the closing quote;
// ok is false for anything else there.
func plainString(body []byte, i int) (s []byte, next int, ok bool) {
	if i >= len(body) || body[i] != '"' {
		return nil, 0, false
	}
	for j := i + 1; j < len(body); j++ {
		switch c := body[j]; {
		case c == '"':
			return body[i+1 : j], j + 1, true
		case c == '\\' || c < 0x20 || c > 0x7e:
			return nil, 0, false
		}
	}
	return nil, 0, false
}

// jsonValueEnd finds where the JSON value starting at body[i] ends, by its
// brackets and strings only: it does not check the value, which the caller
// does with json.Valid. ok is false when no end is found, or the value
// nests deeper than maxPlainDepth.
func jsonValueEnd(body []byte, i int) (end int, ok bool) {
	if i >= len(body) {
		return 0, false
	}
	switch body[i] {
	case '"':
		return jsonStringEnd(body, i)
	case '{', '[':
		depth := 0
		for j := i; j < len(body); j++ {
			switch body[j] {
			case '"':
				e, ok := jsonStringEnd(body, j)
				if !ok {
					return 0, false
				}
				j = e - 1
			case '{', '[':
				depth++
				if depth > maxPlainDepth {
					return 0, false
				}
			case '}', ']':
				depth--
				if depth == 0 {
					return j + 1, true
				}
			}
		}
		return 0, false
	default:
		// A number, true, false or null: up to the space, comma or brace
		// after it in the publish object.
		j := i
		for j < len(body) {
			switch body[j] {
			case ' ', '\t', '\n', '\r', ',', '}':
				return j, j > i
			}
			j++
		}
		return j, j > i
	}
}

// jsonStringEnd returns the index past the closing quote of the JSON
// string starting at body[i], stepping over escaped characters.
func jsonStringEnd(body []byte, i int) (end int, ok bool) {
	for j := i + 1; j < len(body); j++ {
		switch body[j] {
		case '\\':
			j++
		case '"':
			return j + 1, true
		}
	}
	return 0, false
}

// skipJSONSpace returns the index of the first byte from i on that is not
// JSON whitespace.
func skipJSONSpace(body []byte, i int) int {
	for i < len(body) {
		switch body[i] {
		case ' ', '\t', '\n', '\r':
			i++
		default:
			return i
		}
	}
	return i
}
