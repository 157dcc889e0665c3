/* The exact repeat key of an Envoy CheckRequest, read straight from its wire bytes.
 *
 * cut(raw) walks the protobuf encoding down the few paths where the per-request values live
 * (attributes.source.address.socket_address.port_value, attributes.request.time,
 * attributes.request.http.id and the volatile entries of attributes.request.http.headers) and
 * returns
 *
 *     (key, Volatile(request_id, (seconds, nanos) | None, port, {volatile header: value}))
 *
 * (``Volatile`` is the class given to configure(): authz_server.facts.Volatile).
 * The key is the request without those fields: every other field's bytes as they came, and the
 * messages on those paths with their lengths rewritten (as 4 bytes, little-endian) to what is
 * left of them. So two requests have the same key only when they are the same request but for
 * their per-request values (each brings its own), and two such requests from Envoy, which writes
 * a request the same way each time, have the same key whatever the lengths of those values.
 *
 * Anything the walk does not read exactly as upb would (a path field repeated, so that upb would
 * merge; a wire type it does not expect; a oneof sibling that would clear the port; an unusual
 * header entry; bad UTF-8; Envoy's raw-headers form) returns None: the caller then reads the
 * request the slow way, which decides exactly. So None is always safe, and a key is given only
 * when it is exact. This is the hot path of every repeated check: one C call instead of a parse
 * and a deterministic re-serialization in Python.
 *
 * shape(key) reads such a key further, for the audit log: without the request's method, path
 * and headers as well (see it below). redact_headers() is the audit log's loop over a request's
 * headers, and render_inert_request() renders the members that change from one request to the
 * next (headers, method, path, parsed_path, parsed_query) of the usual one whose path redaction
 * cannot change; both here because they run for every request that does not repeat (see them below).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define PATH_MESSAGES 6 /* attributes, source, address, socket_address, request, http */
#define MAX_VOLATILE_NAMES 64

typedef struct {
    const unsigned char *buf;
    unsigned char *out;  /* the key, written as the walk goes: at most the input plus 4 bytes per path message */
    Py_ssize_t out_len;
    /* what was cut */
    Py_ssize_t id_start, id_len;
    int have_id;
    uint32_t port;
    int have_port;
    int64_t seconds;
    int32_t nanos;
    int have_time;
    Py_ssize_t header_key[MAX_VOLATILE_NAMES], header_key_len[MAX_VOLATILE_NAMES];
    Py_ssize_t header_value[MAX_VOLATILE_NAMES], header_value_len[MAX_VOLATILE_NAMES];
    int headers;
} Walk;

static PyObject *volatile_names = NULL; /* tuple of bytes, set by configure() */
static PyObject *volatile_type = NULL;  /* what the values are returned in, set by configure() */

enum { VARINT = 0, I64 = 1, LEN = 2, I32 = 5 };

static int read_varint(const unsigned char *buf, Py_ssize_t *pos, Py_ssize_t end, uint64_t *out) {
    uint64_t value = 0;
    for (int shift = 0; shift < 70; shift += 7) {
        if (*pos >= end) return 0;
        unsigned char byte = buf[(*pos)++];
        if (shift == 63 && byte > 1) return 0; /* more than 64 bits */
        value |= (uint64_t)(byte & 0x7f) << shift;
        if (!(byte & 0x80)) { *out = value; return 1; }
    }
    return 0;
}

/* One field's tag; for LEN fields also where its payload starts and ends. */
typedef struct {
    uint32_t number;
    int wire;
    Py_ssize_t start;          /* first byte of the tag */
    Py_ssize_t tag_end;
    Py_ssize_t payload, end;   /* LEN: payload span; others: end of the value */
    uint64_t varint;           /* VARINT: the value */
} Field;

static int next_field(const unsigned char *buf, Py_ssize_t *pos, Py_ssize_t end, Field *field) {
    uint64_t tag, length;
    field->start = *pos;
    if (!read_varint(buf, pos, end, &tag)) return 0;
    field->tag_end = *pos;
    field->number = (uint32_t)(tag >> 3);
    field->wire = (int)(tag & 7);
    if (field->number == 0 || tag >> 32) return 0;
    switch (field->wire) {
    case VARINT:
        if (!read_varint(buf, pos, end, &field->varint)) return 0;
        break;
    case I64:
        if (end - *pos < 8) return 0;
        *pos += 8;
        break;
    case I32:
        if (end - *pos < 4) return 0;
        *pos += 4;
        break;
    case LEN:
        if (!read_varint(buf, pos, end, &length) || length > (uint64_t)(end - *pos)) return 0;
        field->payload = *pos;
        *pos += (Py_ssize_t)length;
        break;
    default: /* groups: never in these messages */
        return 0;
    }
    field->end = *pos;
    return 1;
}

/* What a message's walker does with each field. */
enum { GIVE_UP = 0, KEEP, CUT, WRITTEN };

typedef int (*FieldHandler)(Walk *, const Field *, int *seen);

static int walk_message(Walk *walk, Py_ssize_t start, Py_ssize_t end, FieldHandler on_field) {
    int seen[2] = {0, 0};
    Py_ssize_t pos = start;
    Field field;
    while (pos < end) {
        if (!next_field(walk->buf, &pos, end, &field)) return 0;
        switch (on_field(walk, &field, seen)) {
        case KEEP:
            memcpy(walk->out + walk->out_len, walk->buf + field.start, (size_t)(field.end - field.start));
            walk->out_len += field.end - field.start;
            break;
        case CUT:
        case WRITTEN:
            break;
        default:
            return 0;
        }
    }
    return 1;
}

/* A message on the path to a per-request value: its tag, the length of what is kept of it, then that. */
static int descend(Walk *walk, const Field *field, FieldHandler on_field) {
    Py_ssize_t tag_length = field->tag_end - field->start;
    memcpy(walk->out + walk->out_len, walk->buf + field->start, (size_t)tag_length);
    walk->out_len += tag_length;
    Py_ssize_t length_at = walk->out_len;
    walk->out_len += 4;
    if (!walk_message(walk, field->payload, field->end, on_field)) return GIVE_UP;
    uint32_t length = (uint32_t)(walk->out_len - length_at - 4);
    for (int i = 0; i < 4; i++) walk->out[length_at + i] = (unsigned char)(length >> (8 * i));
    return WRITTEN;
}

/* A field on the path to a per-request value: once at most (no upb merging), and a message. */
static int path_field(const Field *field, int *seen, int slot) {
    return field->wire == LEN && seen[slot]++ == 0;
}

static int path(Walk *walk, const Field *field, int *seen, int slot, FieldHandler on_field) {
    return path_field(field, seen, slot) ? descend(walk, field, on_field) : GIVE_UP;
}

static int socket_address_field(Walk *walk, const Field *field, int *seen) {
    (void)seen;
    if (field->number == 4) return GIVE_UP; /* named_port: the oneof sibling that clears port_value */
    if (field->number != 3) return KEEP;
    if (field->wire != VARINT || walk->have_port) return GIVE_UP;
    walk->port = (uint32_t)field->varint;
    walk->have_port = 1;
    return CUT;
}

static int address_field(Walk *walk, const Field *field, int *seen) {
    if (field->number == 2 || field->number == 3) { /* pipe, envoy_internal_address: oneof siblings */
        seen[1]++;
        return seen[0] == 0 ? KEEP : GIVE_UP;
    }
    if (field->number != 1) return KEEP;
    return seen[1] == 0 ? path(walk, field, seen, 0, socket_address_field) : GIVE_UP;
}

static int peer_field(Walk *walk, const Field *field, int *seen) {
    return field->number == 1 ? path(walk, field, seen, 0, address_field) : KEEP;
}

static int read_timestamp(Walk *walk, const Field *field) {
    Py_ssize_t pos = field->payload;
    Field inner;
    int64_t seconds = 0;
    int32_t nanos = 0;
    while (pos < field->end) {
        if (!next_field(walk->buf, &pos, field->end, &inner) || inner.wire != VARINT) return GIVE_UP;
        if (inner.number == 1) seconds = (int64_t)inner.varint;
        else if (inner.number == 2) nanos = (int32_t)(uint32_t)inner.varint;
        else return GIVE_UP;
    }
    walk->seconds = seconds;
    walk->nanos = nanos;
    walk->have_time = 1;
    return CUT;
}

static int is_volatile_name(const unsigned char *name, Py_ssize_t length) {
    Py_ssize_t count = PyTuple_GET_SIZE(volatile_names);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *candidate = PyTuple_GET_ITEM(volatile_names, i);
        if (PyBytes_GET_SIZE(candidate) == length && memcmp(PyBytes_AS_STRING(candidate), name, (size_t)length) == 0)
            return 1;
    }
    return 0;
}

/* A headers map entry in the one form Envoy writes: key (1), then value (2) unless empty. */
static int header_entry(Walk *walk, const Field *field) {
    const unsigned char *buf = walk->buf;
    Py_ssize_t pos = field->payload;
    Field key, value;
    if (field->wire != LEN || !next_field(buf, &pos, field->end, &key) || key.number != 1 || key.wire != LEN)
        return GIVE_UP;
    Py_ssize_t value_start = pos, value_len = 0;
    if (pos < field->end) {
        if (!next_field(buf, &pos, field->end, &value) || value.number != 2 || value.wire != LEN
            || pos != field->end)
            return GIVE_UP;
        value_start = value.payload;
        value_len = value.end - value.payload;
    }
    Py_ssize_t key_len = key.end - key.payload;
    if (!is_volatile_name(buf + key.payload, key_len)) return KEEP;
    for (int i = 0; i < walk->headers; i++) /* a repeated key: upb keeps the last; give up instead */
        if (walk->header_key_len[i] == key_len
            && memcmp(buf + walk->header_key[i], buf + key.payload, (size_t)key_len) == 0)
            return GIVE_UP;
    if (walk->headers == MAX_VOLATILE_NAMES) return GIVE_UP;
    walk->header_key[walk->headers] = key.payload;
    walk->header_key_len[walk->headers] = key_len;
    walk->header_value[walk->headers] = value_start;
    walk->header_value_len[walk->headers] = value_len;
    walk->headers++;
    return CUT;
}

static int http_field(Walk *walk, const Field *field, int *seen) {
    (void)seen;
    switch (field->number) {
    case 1: /* id */
        if (field->wire != LEN || walk->have_id) return GIVE_UP;
        walk->id_start = field->payload;
        walk->id_len = field->end - field->payload;
        walk->have_id = 1;
        return CUT;
    case 3: /* headers */
        return header_entry(walk, field);
    case 13: /* header_map: the raw-headers form keeps its volatile values; not a repeat */
        return GIVE_UP;
    default:
        return KEEP;
    }
}

static int request_field(Walk *walk, const Field *field, int *seen) {
    if (field->number == 1) return path_field(field, seen, 0) ? read_timestamp(walk, field) : GIVE_UP;
    if (field->number == 2) return path(walk, field, seen, 1, http_field);
    return KEEP;
}

static int attributes_field(Walk *walk, const Field *field, int *seen) {
    if (field->number == 1) return path(walk, field, seen, 0, peer_field);
    if (field->number == 4) return path(walk, field, seen, 1, request_field);
    return KEEP;
}

static int check_request_field(Walk *walk, const Field *field, int *seen) {
    return field->number == 1 ? path(walk, field, seen, 0, attributes_field) : KEEP;
}

/* NULL with no exception set: a string that is not UTF-8 (the caller answers None). */
static PyObject *utf8(const Walk *walk, Py_ssize_t start, Py_ssize_t length) {
    PyObject *text = PyUnicode_DecodeUTF8((const char *)walk->buf + start, length, NULL);
    if (text == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) PyErr_Clear();
    return text;
}

static PyObject *cut(PyObject *module, PyObject *arg) {
    (void)module;
    if (volatile_names == NULL || volatile_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "configure() the volatile header names and the values' type first");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) != 0) return NULL;
    if (view.len > 0x7fffffff) {
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    Walk walk;
    memset(&walk, 0, sizeof walk);
    walk.buf = (const unsigned char *)view.buf;
    walk.out = PyMem_Malloc((size_t)view.len + 4 * PATH_MESSAGES);
    if (walk.out == NULL) {
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    PyObject *result = NULL, *key = NULL, *request_id = NULL, *time_value = NULL, *headers = NULL, *port = NULL;
    PyObject *values = NULL;
    if (!walk_message(&walk, 0, view.len, check_request_field)) {
        PyMem_Free(walk.out);
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    headers = PyDict_New();
    if (headers == NULL) goto done;
    for (int i = 0; i < walk.headers; i++) {
        PyObject *name = utf8(&walk, walk.header_key[i], walk.header_key_len[i]);
        PyObject *value = name ? utf8(&walk, walk.header_value[i], walk.header_value_len[i]) : NULL;
        int failed = value == NULL || PyDict_SetItem(headers, name, value) != 0;
        Py_XDECREF(name);
        Py_XDECREF(value);
        if (failed) goto done;
    }
    request_id = walk.have_id ? utf8(&walk, walk.id_start, walk.id_len) : PyUnicode_New(0, 0);
    if (request_id == NULL) goto done;
    if (walk.have_time) {
        time_value = Py_BuildValue("(Li)", (long long)walk.seconds, (int)walk.nanos);
        if (time_value == NULL) goto done;
    } else {
        time_value = Py_NewRef(Py_None);
    }
    key = PyBytes_FromStringAndSize((const char *)walk.out, walk.out_len);
    if (key == NULL) goto done;
    port = PyLong_FromUnsignedLong(walk.port);
    if (port == NULL) goto done;
    values = PyObject_CallFunctionObjArgs(volatile_type, request_id, time_value, port, headers, NULL);
    if (values == NULL) goto done;
    result = PyTuple_Pack(2, key, values);
done:
    PyMem_Free(walk.out);
    PyBuffer_Release(&view);
    Py_XDECREF(key);
    Py_XDECREF(request_id);
    Py_XDECREF(time_value);
    Py_XDECREF(headers);
    Py_XDECREF(port);
    Py_XDECREF(values);
    if (result == NULL && !PyErr_Occurred()) Py_RETURN_NONE; /* bad UTF-8 */
    return result;
}

/* shape(key): a key of cut()'s (never anything else) without the request's method, path and
 * headers (HttpRequest fields 2, 4 and 3): the audit log's shape key (envoy._AttributesAsSent.shape).
 * The key is read in the form cut() wrote it: the messages on the way to http (CheckRequest
 * 1, AttributeContext 4, Request 2) and the source (AttributeContext 1) with 4-byte lengths,
 * every other field as it came. The three fields go, every time they occur (what they hold is
 * read from the parsed message, not from here); the rest is kept as it is, the messages on the
 * way with their lengths rewritten again. So two keys give the same shape only when their
 * requests are the same but for their volatile values, method, path and headers (no field of
 * HttpRequest shares a oneof with those three). None when the bytes are not in that form.
 * Called lazily, by the audit log's thread, for a request whose record needs its shape: the
 * request path never pays for it. */

enum { AT_CHECK_REQUEST, AT_ATTRIBUTES, AT_REQUEST, AT_HTTP };

static int read_fixed_length(const unsigned char *buf, Py_ssize_t *pos, Py_ssize_t end, Py_ssize_t *length) {
    if (end - *pos < 4) return 0;
    uint32_t value = 0;
    for (int i = 0; i < 4; i++) value |= (uint32_t)buf[*pos + i] << (8 * i);
    *pos += 4;
    if ((Py_ssize_t)value > end - *pos) return 0;
    *length = (Py_ssize_t)value;
    return 1;
}

/* The message below ``level`` that cut() wrote with a 4-byte length: the level it is (or -1 for
 * the source, copied whole), or -2 when the field is not one of those. */
static int fixed_child(int level, uint32_t number) {
    switch (level) {
    case AT_CHECK_REQUEST: return number == 1 ? AT_ATTRIBUTES : -2;
    case AT_ATTRIBUTES: return number == 4 ? AT_REQUEST : number == 1 ? -1 : -2;
    case AT_REQUEST: return number == 2 ? AT_HTTP : -2;
    default: return -2;
    }
}

static int shape_message(const unsigned char *buf, Py_ssize_t pos, Py_ssize_t end, int level,
                         unsigned char *out, Py_ssize_t *out_len) {
    while (pos < end) {
        Py_ssize_t start = pos;
        uint64_t tag;
        if (!read_varint(buf, &pos, end, &tag) || tag >> 32) return 0;
        uint32_t number = (uint32_t)(tag >> 3);
        int child = fixed_child(level, number);
        if (child != -2) {
            Py_ssize_t length;
            if ((tag & 7) != LEN || !read_fixed_length(buf, &pos, end, &length)) return 0;
            if (child == -1) {
                memcpy(out + *out_len, buf + start, (size_t)(pos + length - start));
                *out_len += pos + length - start;
            } else {
                memcpy(out + *out_len, buf + start, (size_t)(pos - 4 - start));
                *out_len += pos - 4 - start;
                Py_ssize_t length_at = *out_len;
                *out_len += 4;
                if (!shape_message(buf, pos, pos + length, child, out, out_len)) return 0;
                uint32_t kept = (uint32_t)(*out_len - length_at - 4);
                for (int i = 0; i < 4; i++) out[length_at + i] = (unsigned char)(kept >> (8 * i));
            }
            pos += length;
            continue;
        }
        Field field;
        pos = start;
        if (!next_field(buf, &pos, end, &field)) return 0;
        if (level == AT_HTTP && (number == 2 || number == 3 || number == 4)) {
            if (field.wire != LEN) return 0;
            continue;
        }
        memcpy(out + *out_len, buf + field.start, (size_t)(field.end - field.start));
        *out_len += field.end - field.start;
    }
    return 1;
}

static PyObject *shape(PyObject *module, PyObject *arg) {
    (void)module;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) != 0) return NULL;
    unsigned char *out = PyMem_Malloc((size_t)view.len + 1);
    if (out == NULL) {
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    Py_ssize_t out_len = 0;
    PyObject *result;
    if (shape_message((const unsigned char *)view.buf, 0, view.len, AT_CHECK_REQUEST, out, &out_len))
        result = PyBytes_FromStringAndSize((const char *)out, out_len);
    else
        result = Py_NewRef(Py_None);
    PyMem_Free(out);
    PyBuffer_Release(&view);
    return result;
}

/* One header's value through the rule of its name (header_rule(name)); with scrub_text's rule a
 * value shorter than 8 characters is kept as it is and a value equal to the path is the path as
 * redacted already. The name is appended to changed when the value changed. A new reference, or
 * NULL on errors. Both loops below use it, value for value as audit.redact._redact_headers. */
static PyObject *redact_value(PyObject *name, PyObject *value, PyObject *path, PyObject *redacted_path,
                              PyObject *header_rule, PyObject *scrub, PyObject *changed) {
    PyObject *rule = PyObject_CallOneArg(header_rule, name), *redacted;
    if (rule == NULL) return NULL;
    if (rule != scrub) {
        redacted = PyObject_CallOneArg(rule, value);
    } else if (PyUnicode_GET_LENGTH(value) < 8) { /* too short for anything scrub_text recognises */
        redacted = Py_NewRef(value);
    } else {
        int same = PyUnicode_Compare(value, path) == 0; /* two str: no error */
        redacted = same ? Py_NewRef(redacted_path) : PyObject_CallOneArg(scrub, value);
    }
    Py_DECREF(rule);
    if (redacted != NULL && redacted != value) {
        int differs = PyObject_RichCompareBool(redacted, value, Py_NE);
        if (differs < 0 || (differs && PyList_Append(changed, name) != 0)) Py_CLEAR(redacted);
    }
    return redacted;
}

/* redact_headers(headers, path, redacted_path, header_rule, scrub_text): the audit log's loop over
 * a request's headers (audit.redact.Redactor.redact_request, whose Python loop it replaces, value
 * for value): each header's value through the rule of its name (header_rule(name)); with
 * scrub_text's rule a value shorter than 8 characters is kept as it is and a value equal to the
 * path is the path as redacted already. Returns ({name: redacted value}, [names whose value was
 * changed]) in the headers' own order (a protobuf map's or a dict's), or None when a name or
 * value is not a str (the Python loop then does it). About half the Python loop's time, which
 * was a Python round trip per header of every request that does not repeat. */
static PyObject *redact_headers(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 5) return PyErr_Format(PyExc_TypeError, "redact_headers() takes 5 arguments");
    PyObject *headers = args[0], *path = args[1], *redacted_path = args[2], *header_rule = args[3];
    PyObject *scrub = args[4];
    PyObject *out = PyDict_New(), *changed = PyList_New(0), *iterator = PyObject_GetIter(headers);
    PyObject *name = NULL, *value = NULL, *redacted = NULL, *result = NULL;
    if (out == NULL || changed == NULL || iterator == NULL) goto done;
    if (!PyUnicode_CheckExact(path)) goto give_up;
    while ((name = PyIter_Next(iterator)) != NULL) {
        if (!PyUnicode_CheckExact(name)) goto give_up;
        value = PyObject_GetItem(headers, name);
        if (value == NULL) goto done;
        if (!PyUnicode_CheckExact(value)) goto give_up;
        redacted = redact_value(name, value, path, redacted_path, header_rule, scrub, changed);
        if (redacted == NULL) goto done;
        if (PyDict_SetItem(out, name, redacted) != 0) goto done;
        Py_CLEAR(name);
        Py_CLEAR(value);
        Py_CLEAR(redacted);
    }
    if (PyErr_Occurred()) goto done;
    result = PyTuple_Pack(2, out, changed);
    goto done;
give_up:
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(out);
    Py_XDECREF(changed);
    Py_XDECREF(iterator);
    Py_XDECREF(name);
    Py_XDECREF(value);
    Py_XDECREF(redacted);
    return result;
}

/* -- render_inert_request: the changing members of an audit record, rendered as orjson would */

typedef struct {
    char *buf;
    Py_ssize_t len, cap;
} Out;

static int out_reserve(Out *out, Py_ssize_t more) {
    if (out->len + more <= out->cap) return 1;
    Py_ssize_t cap = out->cap ? out->cap : 256;
    while (cap < out->len + more) cap *= 2;
    char *buf = PyMem_Realloc(out->buf, (size_t)cap);
    if (buf == NULL) {
        PyErr_NoMemory();
        return 0;
    }
    out->buf = buf;
    out->cap = cap;
    return 1;
}

static int out_raw(Out *out, const char *text, Py_ssize_t length) {
    if (!out_reserve(out, length)) return 0;
    memcpy(out->buf + out->len, text, (size_t)length);
    out->len += length;
    return 1;
}

/* A JSON string as orjson writes it: '"' and '\' escaped, control characters as \b \t \n \f \r or
 * \u00xx (lowercase hex), everything else (DEL and all of UTF-8 included) as it is. */
static int out_string(Out *out, const char *text, Py_ssize_t length) {
    static const char hex[] = "0123456789abcdef";
    if (!out_reserve(out, 6 * length + 2)) return 0;
    char *at = out->buf + out->len;
    *at++ = '"';
    for (Py_ssize_t i = 0; i < length; i++) {
        unsigned char c = (unsigned char)text[i];
        if (c >= 0x20 && c != '"' && c != '\\') {
            *at++ = (char)c;
            continue;
        }
        *at++ = '\\';
        switch (c) {
        case '"': *at++ = '"'; break;
        case '\\': *at++ = '\\'; break;
        case '\b': *at++ = 'b'; break;
        case '\t': *at++ = 't'; break;
        case '\n': *at++ = 'n'; break;
        case '\f': *at++ = 'f'; break;
        case '\r': *at++ = 'r'; break;
        default:
            *at++ = 'u';
            *at++ = '0';
            *at++ = '0';
            *at++ = hex[c >> 4];
            *at++ = hex[c & 15];
        }
    }
    *at++ = '"';
    out->len = at - out->buf;
    return 1;
}

/* A str as a JSON string; 0 with no exception set when it is not an exact str or holds a lone
 * surrogate (orjson refuses it: the caller's Python path says so), 0 with one on memory errors. */
static int out_str(Out *out, PyObject *value) {
    if (!PyUnicode_CheckExact(value)) return 0;
    Py_ssize_t length;
    const char *text = PyUnicode_AsUTF8AndSize(value, &length);
    if (text == NULL) {
        PyErr_Clear();
        return 0;
    }
    return out_string(out, text, length);
}

/* [\w~-] under re.ASCII: what a query's name or value, or with '/' the path, is made of in an inert path */
static int part_char(char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '~'
        || c == '-';
}

#define MAX_QUERY_PAIRS 256

typedef struct {
    Py_ssize_t key, key_length, value, value_length;
} Pair;

/* Whether path is what audit.redact._INERT_PATH matches whole: [\w~/-]* then, maybe, '?' and
 * '&'-separated parts [\w~-]*(=[\w~-]*)?; its query's non-empty parts in pairs (at most
 * MAX_QUERY_PAIRS, else not inert here), and where the query starts (length: none). */
static int inert_path(const char *path, Py_ssize_t length, Pair *pairs, int *count, Py_ssize_t *query) {
    Py_ssize_t i = 0;
    while (i < length && (part_char(path[i]) || path[i] == '/')) i++;
    *count = 0;
    *query = i;
    if (i == length) return 1;
    if (path[i] != '?') return 0;
    i++;
    for (;;) {
        Pair pair = {i, 0, i, 0};
        while (i < length && part_char(path[i])) i++;
        pair.key_length = i - pair.key;
        pair.value = i;
        if (i < length && path[i] == '=') {
            pair.value = ++i;
            while (i < length && part_char(path[i])) i++;
            pair.value_length = i - pair.value;
        }
        if (i > pair.key) { /* a part at all ("a", "=b", "a="): an empty one is skipped, as parse_query does */
            if (*count == MAX_QUERY_PAIRS) return 0;
            pairs[(*count)++] = pair;
        }
        if (i == length) return 1;
        if (path[i] != '&') return 0;
        i++;
    }
}

/* Whether a query name, lowercased, is one of token_parameters (audit.redact.TOKEN_PARAMETERS):
 * -1 on errors. */
static int token_parameter(const char *name, Py_ssize_t length, PyObject *token_parameters) {
    char lowered[64];
    if (length > (Py_ssize_t)sizeof lowered) return 0; /* longer than any of them */
    for (Py_ssize_t i = 0; i < length; i++)
        lowered[i] = (char)(name[i] >= 'A' && name[i] <= 'Z' ? name[i] + 32 : name[i]);
    PyObject *key = PyUnicode_FromStringAndSize(lowered, length);
    if (key == NULL) return -1;
    int found = PySet_Contains(token_parameters, key);
    Py_DECREF(key);
    return found;
}

static int same(const char *path, const Pair *a, const Pair *b) {
    return a->key_length == b->key_length && memcmp(path + a->key, path + b->key, (size_t)a->key_length) == 0;
}

/* facts.parse_path_and_query of an inert path (nothing to unescape), rendered: the path without
 * its leading '/'s split on '/', and the query's values by name in the order names first come. */
static int out_parsed(Out *parsed_path, Out *parsed_query, const char *path, Py_ssize_t query, const Pair *pairs,
                      int count) {
    Py_ssize_t start = 0;
    while (start < query && path[start] == '/') start++;
    if (!out_raw(parsed_path, "[", 1)) return 0;
    for (Py_ssize_t i = start;; i++) {
        if (i == query || path[i] == '/') {
            if (parsed_path->len > 1 && !out_raw(parsed_path, ",", 1)) return 0;
            if (!out_string(parsed_path, path + start, i - start)) return 0;
            if (i == query) break;
            start = i + 1;
        }
    }
    if (!out_raw(parsed_path, "]", 1) || !out_raw(parsed_query, "{", 1)) return 0;
    for (int i = 0; i < count; i++) {
        int seen = 0;
        for (int j = 0; j < i && !seen; j++) seen = same(path, &pairs[j], &pairs[i]);
        if (seen) continue;
        if ((parsed_query->len > 1 && !out_raw(parsed_query, ",", 1))
            || !out_string(parsed_query, path + pairs[i].key, pairs[i].key_length)
            || !out_raw(parsed_query, ":[", 2))
            return 0;
        for (int j = i, first = 1; j < count; j++) {
            if (!same(path, &pairs[j], &pairs[i])) continue;
            if ((!first && !out_raw(parsed_query, ",", 1))
                || !out_string(parsed_query, path + pairs[j].value, pairs[j].value_length))
                return 0;
            first = 0;
        }
        if (!out_raw(parsed_query, "]", 1)) return 0;
    }
    return out_raw(parsed_query, "}", 1);
}

/* The headers object, each value through its name's rule as redact_headers does (the path
 * being inert, a value equal to it is kept); the names whose value changed appended to changed.
 * 1 done, 0 not for this path (no exception), -1 an error. */
static int out_headers(Out *out, PyObject *changed, PyObject *headers, PyObject *path, PyObject *header_rule,
                       PyObject *scrub) {
    PyObject *iterator = PyObject_GetIter(headers), *name = NULL, *value = NULL, *redacted = NULL;
    int status = -1;
    if (iterator == NULL || !out_raw(out, "{", 1)) goto done;
    while ((name = PyIter_Next(iterator)) != NULL) {
        value = PyObject_GetItem(headers, name);
        if (value == NULL) goto done;
        if (!PyUnicode_CheckExact(name) || !PyUnicode_CheckExact(value)) {
            status = 0;
            goto done;
        }
        redacted = redact_value(name, value, path, path, header_rule, scrub, changed);
        if (redacted == NULL) goto done;
        if (out->len > 1 && !out_raw(out, ",", 1)) goto done;
        int written = out_str(out, name);
        if (written && !out_raw(out, ":", 1)) goto done;
        if (written) written = out_str(out, redacted);
        if (!written) {
            status = PyErr_Occurred() ? -1 : 0;
            goto done;
        }
        Py_CLEAR(name);
        Py_CLEAR(value);
        Py_CLEAR(redacted);
    }
    if (PyErr_Occurred() || !out_raw(out, "}", 1)) goto done;
    status = 1;
done:
    Py_XDECREF(iterator);
    Py_XDECREF(name);
    Py_XDECREF(value);
    Py_XDECREF(redacted);
    return status;
}

/* render_inert_request(method, path, headers, header_rule, scrub_text, token_parameters): what
 * audit.redact.Redactor.redact_request and orjson make of a request's changing members when its
 * path is inert (audit.redact._INERT_PATH, no query name in token_parameters) and its method is
 * shorter than 8 characters, so that redaction can change none of them but the headers:
 * (headers, method, path, parsed_path, parsed_query) as JSON bytes, and the names of the headers
 * whose value redaction changed, in the headers' order. None for any other request (the Python
 * path then does it, exactly). One call instead of the parse, the redaction's loops and five
 * renderings of a record of every request that does not repeat. */
static PyObject *render_inert_request(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 6) return PyErr_Format(PyExc_TypeError, "render_inert_request() takes 6 arguments");
    PyObject *method = args[0], *path = args[1], *headers = args[2], *header_rule = args[3], *scrub = args[4];
    PyObject *token_parameters = args[5];
    if (!PyUnicode_CheckExact(method) || PyUnicode_GET_LENGTH(method) >= 8 || !PyUnicode_CheckExact(path)
        || !PyUnicode_IS_ASCII(path) || !PyAnySet_Check(token_parameters))
        Py_RETURN_NONE;
    const char *text = (const char *)PyUnicode_DATA(path);
    Py_ssize_t length = PyUnicode_GET_LENGTH(path), query;
    Pair pairs[MAX_QUERY_PAIRS]; /* 8 KB on the stack: no allocation per record */
    int count;
    Out rendered[5] = {{0}}; /* headers, method, path, parsed_path, parsed_query */
    PyObject *changed = NULL, *result = NULL;
    if (!inert_path(text, length, pairs, &count, &query)) goto not_here;
    for (int i = 0; i < count; i++) {
        int found = token_parameter(text + pairs[i].key, pairs[i].key_length, token_parameters);
        if (found < 0) goto done;
        if (found) goto not_here;
    }
    changed = PyList_New(0);
    if (changed == NULL) goto done;
    int status = out_headers(&rendered[0], changed, headers, path, header_rule, scrub);
    if (status < 0) goto done;
    if (status == 0) goto not_here;
    if (!out_str(&rendered[1], method)) goto not_or_error;
    if (!out_string(&rendered[2], text, length) || !out_parsed(&rendered[3], &rendered[4], text, query, pairs, count))
        goto done;
    result = PyTuple_New(6);
    if (result == NULL) goto done;
    for (int i = 0; i < 5; i++) {
        PyObject *bytes = PyBytes_FromStringAndSize(rendered[i].buf, rendered[i].len);
        if (bytes == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyTuple_SET_ITEM(result, i, bytes);
    }
    PyTuple_SET_ITEM(result, 5, Py_NewRef(changed));
    goto done;
not_or_error:
    if (PyErr_Occurred()) goto done;
not_here:
    result = Py_NewRef(Py_None);
done:
    for (int i = 0; i < 5; i++) PyMem_Free(rendered[i].buf);
    Py_XDECREF(changed);
    return result;
}

static PyObject *configure(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *names, *type;
    if (!PyArg_ParseTuple(args, "OO:configure", &names, &type)) return NULL;
    if (!PyCallable_Check(type)) return PyErr_Format(PyExc_TypeError, "the values' type must be callable");
    PyObject *tuple = PySequence_Tuple(names);
    if (tuple == NULL) return NULL;
    Py_ssize_t count = PyTuple_GET_SIZE(tuple);
    if (count > MAX_VOLATILE_NAMES) {
        Py_DECREF(tuple);
        return PyErr_Format(PyExc_ValueError, "at most %d volatile header names", MAX_VOLATILE_NAMES);
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        if (!PyBytes_Check(PyTuple_GET_ITEM(tuple, i))) {
            Py_DECREF(tuple);
            return PyErr_Format(PyExc_TypeError, "volatile header names must be bytes");
        }
    }
    Py_XSETREF(volatile_names, tuple);
    Py_XSETREF(volatile_type, Py_NewRef(type));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"cut", cut, METH_O, "cut(raw) -> (key, Volatile(request_id, (seconds, nanos) | None, port, {header: value})) | None"},
    {"configure", configure, METH_VARARGS,
     "configure(names, volatile_type): the header names (bytes) whose entries are cut, and the values' type"},
    {"shape", shape, METH_O, "shape(key) -> a key of cut()'s without the method, path and headers | None"},
    {"redact_headers", (PyCFunction)(void (*)(void))redact_headers, METH_FASTCALL,
     "redact_headers(headers, path, redacted_path, header_rule, scrub_text) -> ({name: value}, [changed]) | None"},
    {"render_inert_request", (PyCFunction)(void (*)(void))render_inert_request, METH_FASTCALL,
     "render_inert_request(method, path, headers, header_rule, scrub_text, token_parameters) -> "
     "(headers, method, path, parsed_path, parsed_query, [changed]) | None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_volatile_cut",
    "The exact repeat key of a CheckRequest, cut from its wire bytes; its audit shape; the audit headers loop.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__volatile_cut(void) { return PyModule_Create(&module_def); }
