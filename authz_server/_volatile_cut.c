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
 * record() makes the usual audit record whole (audit.builder.RecordBuilder._fast in C), with the
 * same rendering helpers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "_slots.h"

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

/* Whether scrub_text (audit.redact) leaves text as it is without asking it: it only ever changes a
 * string of 8 characters or more holding a '.' (after "ey"), a space or tab, a '=' or a '"'. */
static int scrub_cannot_change(PyObject *text) {
    Py_ssize_t length = PyUnicode_GET_LENGTH(text);
    if (length < 8) return 1;
    if (!PyUnicode_IS_ASCII(text)) return 0;
    const char *at = (const char *)PyUnicode_DATA(text);
    for (Py_ssize_t i = 0; i < length; i++) {
        char c = at[i];
        if (c == '.' || c == ' ' || c == '\t' || c == '=' || c == '"') return 0;
    }
    return 1;
}

/* One header's value through the rule of its name (header_rule(name)); with scrub_text's rule a
 * value it cannot change is kept as it is and a value equal to the path (when there is one: NULL
 * for the volatile headers) is the path as redacted already. The name is appended to changed when
 * the value changed. A new reference, or NULL on errors. Every header loop here uses it, value
 * for value as audit.redact._redact_headers and Redactor.redact_volatile. */
static PyObject *redact_value(PyObject *name, PyObject *value, PyObject *path, PyObject *redacted_path,
                              PyObject *header_rule, PyObject *scrub, PyObject *changed) {
    PyObject *rule = PyObject_CallOneArg(header_rule, name), *redacted;
    if (rule == NULL) return NULL;
    if (rule != scrub) {
        redacted = PyObject_CallOneArg(rule, value);
    } else if (scrub_cannot_change(value)) {
        redacted = Py_NewRef(value);
    } else {
        int same = path != NULL && PyUnicode_Compare(value, path) == 0; /* two str: no error */
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
    Py_ssize_t first_cap; /* what its first allocation takes (0: 256 bytes) */
} Out;

static int out_reserve(Out *out, Py_ssize_t more) {
    if (out->len + more <= out->cap) return 1;
    Py_ssize_t cap = out->cap ? out->cap : out->first_cap ? out->first_cap : 256;
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
    if (length == 0) return 1; /* text may be an empty Out's NULL */
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

/* The changing members of an inert request rendered (see render_inert_request below) into
 * rendered[0..4] (headers, method, path, parsed_path, parsed_query), the names of the headers
 * whose value redaction changed appended to changed. 1 done, 0 not for this request (no
 * exception), -1 an error. */
static int render_inert(PyObject *method, PyObject *path, PyObject *headers, PyObject *header_rule, PyObject *scrub,
                        PyObject *token_parameters, Out *rendered, PyObject *changed) {
    if (!PyUnicode_CheckExact(method) || PyUnicode_GET_LENGTH(method) >= 8 || !PyUnicode_CheckExact(path)
        || !PyUnicode_IS_ASCII(path) || !PyAnySet_Check(token_parameters))
        return 0;
    const char *text = (const char *)PyUnicode_DATA(path);
    Py_ssize_t length = PyUnicode_GET_LENGTH(path), query;
    Pair pairs[MAX_QUERY_PAIRS]; /* 8 KB on the stack: no allocation per record */
    int count;
    if (!inert_path(text, length, pairs, &count, &query)) return 0;
    for (int i = 0; i < count; i++) {
        int found = token_parameter(text + pairs[i].key, pairs[i].key_length, token_parameters);
        if (found) return found < 0 ? -1 : 0;
    }
    int status = out_headers(&rendered[0], changed, headers, path, header_rule, scrub);
    if (status <= 0) return status;
    if (!out_str(&rendered[1], method)) return PyErr_Occurred() ? -1 : 0;
    return out_string(&rendered[2], text, length) && out_parsed(&rendered[3], &rendered[4], text, query, pairs, count)
        ? 1 : -1;
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
    Out rendered[5] = {{0}};
    PyObject *changed = PyList_New(0), *result = NULL;
    if (changed == NULL) return NULL;
    int status = render_inert(args[0], args[1], args[2], args[3], args[4], args[5], rendered, changed);
    if (status == 0) {
        result = Py_NewRef(Py_None);
    } else if (status > 0 && (result = PyTuple_New(6)) != NULL) {
        for (int i = 0; i < 5; i++) {
            PyObject *bytes = PyBytes_FromStringAndSize(rendered[i].buf, rendered[i].len);
            if (bytes == NULL) {
                Py_CLEAR(result);
                break;
            }
            PyTuple_SET_ITEM(result, i, bytes);
        }
        if (result != NULL) PyTuple_SET_ITEM(result, 5, Py_NewRef(changed));
    }
    for (int i = 0; i < 5; i++) PyMem_Free(rendered[i].buf);
    Py_DECREF(changed);
    return result;
}

/* -- record: the audit record of the usual decision, in one call (audit.builder.RecordBuilder._fast) */

/* A string literal's bytes. */
#define out_literal(out, text) out_raw((out), (text), sizeof(text) - 1)

/* Set by configure_records(): what the Python fast path uses, so that this one does the same. */
static PyObject *rec_dumps = NULL, *rec_scrub = NULL, *rec_header_rule = NULL, *rec_header_pointer = NULL;
static PyObject *rec_token_parameters = NULL, *rec_template_type = NULL, *rec_changing_type = NULL;
static PyObject *rec_record_type = NULL, *rec_parse_body = NULL;
static PyObject *s_decision_id, *s_policy_version, *s_identity, *s_signals, *s_result, *s_allowed, *s_code,
    *s_reason, *s_http_status, *s_phase, *s_cached, *s_dry_run, *s_would_allow, *s_explanation, *s_fingerprint,
    *s_attributes_factory, *s_shape, *s_headers, *s_body, *s_raw_body, *s_source_address, *s_source_port,
    *s_transport, *s_request_id, *s_port, *s_time_value, *s_fragments, *s_slots, *s_masked, *s_erased,
    *s_rendered, *s_subject, *s_spiffe_id, *s_keep, *s_who, *s_verdict, *s_signals_member, *s_result_method,
    *s_second, *s_prefix, *s_grpc, *s_http, *s_partial_body;

/* scrub_text(text) for an exact str, a new reference. */
static PyObject *scrubbed(PyObject *text) {
    return scrub_cannot_change(text) ? Py_NewRef(text) : PyObject_CallOneArg(rec_scrub, text);
}

static int out_bytes(Out *out, PyObject *bytes) {
    if (!PyBytes_Check(bytes)) {
        PyErr_SetString(PyExc_TypeError, "a rendered fragment must be bytes");
        return 0;
    }
    return out_raw(out, PyBytes_AS_STRING(bytes), PyBytes_GET_SIZE(bytes));
}

/* Any value as orjson writes it: str, bool, None and 64-bit int here, the rest through orjson
 * itself (which raises what the Python path would). 1 done, 0 an error. */
static int out_json(Out *out, PyObject *value) {
    if (PyUnicode_CheckExact(value)) {
        if (out_str(out, value)) return 1;
        if (PyErr_Occurred()) return 0;
    } else if (value == Py_True) {
        return out_literal(out, "true");
    } else if (value == Py_False) {
        return out_literal(out, "false");
    } else if (value == Py_None) {
        return out_literal(out, "null");
    } else if (PyLong_CheckExact(value)) {
        int overflow;
        long long number = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (!overflow && !(number == -1 && PyErr_Occurred())) {
            char text[24];
            int length = snprintf(text, sizeof text, "%lld", number);
            return out_raw(out, text, length);
        }
        PyErr_Clear();
    }
    PyObject *rendered = PyObject_CallOneArg(rec_dumps, value);
    if (rendered == NULL) return 0;
    int done = out_bytes(out, rendered);
    Py_DECREF(rendered);
    return done;
}

/* A list of str (masked, erased pointers) as a JSON array. */
static int out_list(Out *out, PyObject *list) {
    if (!out_literal(out, "[")) return 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); i++)
        if ((i && !out_literal(out, ",")) || !out_json(out, PyList_GET_ITEM(list, i))) return 0;
    return out_literal(out, "]");
}

/* Appends a tuple's (or list's) items to list. */
static int extend(PyObject *list, PyObject *items) {
    return items != NULL && PyList_SetSlice(list, PY_SSIZE_T_MAX, PY_SSIZE_T_MAX, items) == 0;
}

/* What a record keeps across requests (RecordBuilder.c_state), by position. */
enum { ST_BUILDER, ST_CHANGING, ST_SIGHTED, ST_SHAPES, ST_VERDICTS, ST_IDENTITIES, ST_SIGNALS, ST_TIMESTAMP,
       ST_HEAD, ST_SIZE };
/* RecordBuilder._head in pieces: before the decision id, before the timestamp, before the revision, after it */
enum { HEAD_ID, HEAD_TIME, HEAD_REVISION, HEAD_INPUT, HEAD_SIZE };

/* The JSON pointers (header_pointer) of the headers whose value redaction changed, appended to
 * masked in their order. 1 done, 0 an error. */
static int append_pointers(PyObject *masked, PyObject *changed) {
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(changed); i++) {
        PyObject *pointer = PyObject_CallOneArg(rec_header_pointer, PyList_GET_ITEM(changed, i));
        int appended = pointer != NULL && PyList_Append(masked, pointer) == 0;
        Py_XDECREF(pointer);
        if (!appended) return 0;
    }
    return 1;
}

/* The volatile values of a request, redacted and rendered (RecordBuilder._volatile_values and
 * Redactor.redact_volatile): the request id, port and time for their slots, the volatile headers
 * as a JSON object ("" when none), and whether redaction changed the request id. 1 done, 0 not
 * here (no exception: the Python path), -1 an error. */
typedef struct {
    Out id, port, time, headers;
    int id_changed;
} Volatiles;

static int redact_volatiles(Volatiles *v, PyObject *request_id, PyObject *port, PyObject *time_value,
                            PyObject *headers, PyObject *masked) {
    if (!PyUnicode_CheckExact(request_id) || !PyLong_CheckExact(port) || !PyDict_CheckExact(headers)) return 0;
    PyObject *redacted = scrubbed(request_id);
    if (redacted == NULL) return -1;
    int differs = redacted == request_id ? 0 : PyObject_RichCompareBool(redacted, request_id, Py_NE);
    int written = differs >= 0 && out_str(&v->id, redacted);
    Py_DECREF(redacted);
    if (differs < 0) return -1;
    if (!written) return PyErr_Occurred() ? -1 : 0;
    v->id_changed = differs;
    if (differs) {
        PyObject *pointer = PyUnicode_FromString("/input/attributes/request/http/id");
        int appended = pointer != NULL && PyList_Append(masked, pointer) == 0;
        Py_XDECREF(pointer);
        if (!appended) return -1;
    }
    if (!out_json(&v->port, port)) return -1;
    if (time_value != Py_None) {
        if (!PyTuple_CheckExact(time_value) || PyTuple_GET_SIZE(time_value) != 2) return 0;
        PyObject *seconds_value = PyTuple_GET_ITEM(time_value, 0), *nanos_value = PyTuple_GET_ITEM(time_value, 1);
        if (!PyLong_CheckExact(seconds_value) || !PyLong_CheckExact(nanos_value)) return 0;
        long long seconds = PyLong_AsLongLong(seconds_value), nanos = PyLong_AsLongLong(nanos_value);
        if (PyErr_Occurred()) { /* beyond 64 bits: the Python path renders it */
            PyErr_Clear();
            return 0;
        }
        char text[64];
        int length;
        if (seconds && nanos) length = snprintf(text, sizeof text, "{\"seconds\":%lld,\"nanos\":%lld}", seconds, nanos);
        else if (seconds) length = snprintf(text, sizeof text, "{\"seconds\":%lld}", seconds);
        else if (nanos) length = snprintf(text, sizeof text, "{\"nanos\":%lld}", nanos);
        else length = snprintf(text, sizeof text, "{}");
        if (!out_raw(&v->time, text, length)) return -1;
    }
    PyObject *changed = PyList_New(0);
    if (changed == NULL) return -1;
    Py_ssize_t position = 0;
    PyObject *name, *value;
    int status = 1;
    while (status > 0 && PyDict_Next(headers, &position, &name, &value)) {
        if (!PyUnicode_CheckExact(name) || !PyUnicode_CheckExact(value)) {
            status = 0;
            break;
        }
        Py_INCREF(name);
        Py_INCREF(value);
        PyObject *clean = redact_value(name, value, NULL, NULL, rec_header_rule, rec_scrub, changed);
        if (clean == NULL) status = -1;
        else if (!(out_raw(&v->headers, v->headers.len ? "," : "{", 1) && out_str(&v->headers, name)
                   && out_literal(&v->headers, ":") && out_str(&v->headers, clean)))
            status = PyErr_Occurred() ? -1 : 0;
        Py_XDECREF(clean);
        Py_DECREF(name);
        Py_DECREF(value);
    }
    if (status > 0) status = append_pointers(masked, changed) && (!v->headers.len || out_literal(&v->headers, "}"))
        ? 1 : -1;
    Py_DECREF(changed);
    return status;
}

/* The request's changing members of a request that does not repeat (RecordBuilder._redact_changing
 * for a request without a body whose path is inert): (headers, method, path, parsed_path,
 * parsed_query, parsed_body, truncated_body) rendered in rendered[0..6], the masked pointers in
 * masked. 1 done, 0 not here, -1 an error. */
static int redact_changing(PyObject *facts, PyObject *method, PyObject *path, PyObject *headers, Out *rendered,
                           PyObject *masked) {
    PyObject *request_headers = attribute(facts, s_headers), *body = NULL, *raw_body = NULL, *parsed = NULL;
    PyObject *changed = NULL;
    int status = -1;
    if (request_headers == NULL || (body = attribute(facts, s_body)) == NULL
        || (raw_body = attribute(facts, s_raw_body)) == NULL)
        goto done;
    int empty = PyUnicode_CheckExact(body) && PyUnicode_GET_LENGTH(body) == 0 && PyBytes_CheckExact(raw_body)
        && PyBytes_GET_SIZE(raw_body) == 0;
    int partial = empty ? PySequence_Contains(request_headers, s_partial_body) : 1;
    if (partial < 0) PyErr_Clear(); /* parse_body says what such headers mean */
    if (empty && partial == 0) {
        parsed = PyTuple_Pack(2, Py_None, Py_False); /* parse_body's answer for the usual request */
    } else {
        PyObject *args[3] = {request_headers, body, raw_body};
        parsed = PyObject_Vectorcall(rec_parse_body, args, 3, NULL);
    }
    if (parsed == NULL) { /* a body the front would refuse: the Python path says what happens */
        PyErr_Clear();
        status = 0;
        goto done;
    }
    status = 0;
    if (!PyTuple_CheckExact(parsed) || PyTuple_GET_SIZE(parsed) != 2 || PyTuple_GET_ITEM(parsed, 0) != Py_None)
        goto done;
    int truncated = PyObject_IsTrue(PyTuple_GET_ITEM(parsed, 1));
    if (truncated < 0) {
        status = -1;
        goto done;
    }
    if ((changed = PyList_New(0)) == NULL) {
        status = -1;
        goto done;
    }
    status = render_inert(method, path, headers, rec_header_rule, rec_scrub, rec_token_parameters, rendered, changed);
    if (status <= 0) goto done;
    status = -1;
    if (!out_literal(&rendered[5], "null")
        || !(truncated ? out_literal(&rendered[6], "true") : out_literal(&rendered[6], "false")))
        goto done;
    if (!append_pointers(masked, changed)) goto done;
    status = 1;
done:
    Py_XDECREF(request_headers);
    Py_XDECREF(body);
    Py_XDECREF(raw_body);
    Py_XDECREF(parsed);
    Py_XDECREF(changed);
    return status;
}

/* A new reference to the named tuple the Python path keeps for a request that repeats (_Changing). */
static PyObject *new_changing(PyObject *key, Out *rendered, PyObject *masked) {
    PyObject *values = PyTuple_New(6), *headers = NULL, *masked_tuple = NULL, *empty = NULL, *changing = NULL;
    if (values == NULL) return NULL;
    for (int i = 0; i < 6; i++) {
        PyObject *bytes = PyBytes_FromStringAndSize(rendered[i + 1].buf, rendered[i + 1].len);
        if (bytes == NULL) goto done;
        PyTuple_SET_ITEM(values, i, bytes);
    }
    headers = PyBytes_FromStringAndSize(rendered[0].buf, rendered[0].len);
    masked_tuple = PyList_AsTuple(masked);
    empty = PyTuple_New(0);
    if (headers != NULL && masked_tuple != NULL && empty != NULL) {
        PyObject *args[5] = {key, headers, values, masked_tuple, empty};
        changing = PyObject_Vectorcall(rec_changing_type, args, 5, NULL);
    }
done:
    Py_DECREF(values);
    Py_XDECREF(headers);
    Py_XDECREF(masked_tuple);
    Py_XDECREF(empty);
    return changing;
}

static int call_keep(PyObject *memo, PyObject *key, PyObject *value) {
    PyObject *result = PyObject_CallMethodObjArgs(memo, s_keep, key, value, NULL);
    Py_XDECREF(result);
    return result != NULL;
}

typedef struct {
    const char *buf;
    Py_ssize_t len;
} Piece;

/* The template's fragments around the values of its slots (audit.builder._fill). */
static int out_filled(Out *out, PyObject *template, const Piece *values, int value_count) {
    PyObject *fragments = attribute(template, s_fragments), *slots = attribute(template, s_slots);
    int done = 0;
    if (fragments == NULL || slots == NULL) goto end;
    if (!PyTuple_CheckExact(fragments) || !PyTuple_CheckExact(slots)
        || PyTuple_GET_SIZE(fragments) != PyTuple_GET_SIZE(slots) + 1) {
        PyErr_SetString(PyExc_TypeError, "a template's fragments go around its slots");
        goto end;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(slots); i++) {
        long slot = PyLong_AsLong(PyTuple_GET_ITEM(slots, i));
        if (slot < 0 || slot >= value_count) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "a template's slot out of range");
            goto end;
        }
        if (!out_bytes(out, PyTuple_GET_ITEM(fragments, i)) || !out_raw(out, values[slot].buf, values[slot].len))
            goto end;
    }
    done = out_bytes(out, PyTuple_GET_ITEM(fragments, PyTuple_GET_SIZE(slots)));
end:
    Py_XDECREF(fragments);
    Py_XDECREF(slots);
    return done;
}

/* Bytes as a piece (borrowed: the bytes outlive its use); 0 with an error when not bytes. */
static int piece_of(Piece *piece, PyObject *bytes) {
    if (!PyBytes_Check(bytes)) {
        PyErr_SetString(PyExc_TypeError, "a rendered fragment must be bytes");
        return 0;
    }
    piece->buf = PyBytes_AS_STRING(bytes);
    piece->len = PyBytes_GET_SIZE(bytes);
    return 1;
}

static Piece out_piece(const Out *out) { return (Piece){out->buf, out->len}; }

/* The record's head: decision id, timestamp (RecordBuilder._timestamp, _Timestamps: its seconds
 * formatted once per second, by it) and revision. 1 done, 0 not here, -1 an error. */
static int out_head(Out *out, PyObject *head, PyObject *timestamps, PyObject *decision_id, PyObject *now,
                    PyObject *revision) {
    if (!PyUnicode_CheckExact(decision_id) || !PyUnicode_CheckExact(revision)) return 0;
    if (!out_bytes(out, PyTuple_GET_ITEM(head, HEAD_ID))) return -1;
    if (!out_str(out, decision_id)) return PyErr_Occurred() ? -1 : 0;
    if (!out_bytes(out, PyTuple_GET_ITEM(head, HEAD_TIME))) return -1;
    /* _Timestamps.__call__'s arithmetic: modf, microseconds rounded half to even, a carry */
    double whole, fraction = modf(PyFloat_AS_DOUBLE(now), &whole), micros = nearbyint(fraction * 1e6);
    if (micros >= 1e6) {
        whole += 1.0;
        micros -= 1e6;
    } else if (micros < 0) {
        whole -= 1.0;
        micros += 1e6;
    }
    PyObject *second = attribute(timestamps, s_second);
    if (second == NULL) return -1;
    int same = PyFloat_CheckExact(second) && PyFloat_AS_DOUBLE(second) == whole;
    Py_DECREF(second);
    if (same) {
        PyObject *prefix = attribute(timestamps, s_prefix);
        char text[16];
        int length = snprintf(text, sizeof text, "%06dZ", (int)micros);
        int written = prefix != NULL && out_bytes(out, prefix) && out_raw(out, text, length);
        Py_XDECREF(prefix);
        if (!written) return -1;
    } else { /* a new second: the Python object formats it, and keeps it */
        PyObject *stamp = PyObject_CallOneArg(timestamps, now);
        int written = stamp != NULL && out_bytes(out, stamp);
        Py_XDECREF(stamp);
        if (!written) return -1;
    }
    if (!out_bytes(out, PyTuple_GET_ITEM(head, HEAD_REVISION))) return -1;
    if (!out_str(out, revision)) return PyErr_Occurred() ? -1 : 0;
    return out_bytes(out, PyTuple_GET_ITEM(head, HEAD_INPUT)) ? 1 : -1;
}

/* New references a record's call holds until it returns. */
#define HELD_MAX 64
typedef struct {
    PyObject *refs[HELD_MAX];
    int count;
} Held;

/* obj (a new reference, or NULL on an error) kept to be released at the end. */
static PyObject *hold(Held *held, PyObject *obj) {
    if (obj != NULL) {
        if (held->count == HELD_MAX) {
            Py_DECREF(obj);
            PyErr_SetString(PyExc_RuntimeError, "a record holds too many references");
            return NULL;
        }
        held->refs[held->count++] = obj;
    }
    return obj;
}

static PyObject *attr(Held *held, PyObject *object, PyObject *name) { return hold(held, attribute(object, name)); }

/* A memo's entry (a _Memo: an OrderedDict, read as the dict it is), borrowed; NULL when missing
 * (with an error set on errors). */
static PyObject *memo_get(PyObject *memo, PyObject *key) { return PyDict_GetItemWithError(memo, key); }

/* A kept entry, or what the builder's own method makes (and keeps) on a miss: a reference held. */
static PyObject *entry_or(Held *held, PyObject *memo, PyObject *key, PyObject *builder, PyObject *method,
                          PyObject *argument) {
    PyObject *entry = key == NULL ? NULL : memo_get(memo, key);
    if (entry != NULL) return hold(held, Py_NewRef(entry));
    if (PyErr_Occurred()) return NULL;
    return hold(held, PyObject_CallMethodOneArg(builder, method, argument));
}

/* record(state, decision, facts, volatile, now, handler_ns): RecordBuilder._fast for the usual
 * decision, byte for byte (tests/unit/test_audit_fast_path.py holds the two together): the
 * request's members from its shape's template, the changing ones rendered here when the request
 * has no body and an inert path (as render_inert_request), every other member from what the
 * builder keeps, asking the builder's own methods on a miss. The AuditRecord, or None where the
 * Python path must do it (no explanation, an exact str for every id, a shape and its template
 * known, ...), before anything was kept. The Python path's per-record work was most of what a
 * record costs a busy server, where each of its many small steps finds its data gone cold. */
static PyObject *record(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 6) return PyErr_Format(PyExc_TypeError, "record() takes 6 arguments");
    PyObject *state = args[0], *decision = args[1], *facts = args[2], *volatile_ = args[3], *now = args[4];
    PyObject *handler_ns = args[5];
    if (rec_dumps == NULL) return PyErr_Format(PyExc_RuntimeError, "configure_records() first");
    if (!PyTuple_CheckExact(state) || PyTuple_GET_SIZE(state) != ST_SIZE)
        return PyErr_Format(PyExc_TypeError, "record() takes the builder's c_state");
    PyObject *head = PyTuple_GET_ITEM(state, ST_HEAD), *builder = PyTuple_GET_ITEM(state, ST_BUILDER);
    if (!PyFloat_CheckExact(now) || !isfinite(PyFloat_AS_DOUBLE(now)) || !PyLong_CheckExact(handler_ns)
        || !PyTuple_CheckExact(head) || PyTuple_GET_SIZE(head) != HEAD_SIZE)
        Py_RETURN_NONE;
    Held held = {{0}, 0};
    Out out = {.first_cap = 4096}, changing_out[7] = {{0}}, joined_headers = {0}; /* a record: 2-3 KB */
    Volatiles v = {{0}, {0}, {0}, {0}, 0};
    PyObject *result = NULL, *masked = NULL, *erased = NULL, *volatile_masked = NULL, *key = NULL;
    PyObject *template_key = NULL;
    int status;
    masked = PyList_New(0);
    erased = PyList_New(0);
    volatile_masked = PyList_New(0);
    if (masked == NULL || erased == NULL || volatile_masked == NULL) goto done;

    /* -- what only the Python path does */
    PyObject *explanation = attr(&held, decision, s_explanation);
    if (explanation == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) goto done;
        PyErr_Clear(); /* getattr(decision, "explanation", None) */
    } else if (explanation != Py_None) {
        goto python;
    }
    PyObject *request_id = attr(&held, volatile_, s_request_id), *port = attr(&held, volatile_, s_port);
    PyObject *time_value = attr(&held, volatile_, s_time_value), *volatile_headers = attr(&held, volatile_, s_headers);
    PyObject *fingerprint = attr(&held, facts, s_fingerprint), *facts_request_id = attr(&held, facts, s_request_id);
    PyObject *source_address = attr(&held, facts, s_source_address), *transport = attr(&held, facts, s_transport);
    if (request_id == NULL || port == NULL || time_value == NULL || volatile_headers == NULL || fingerprint == NULL
        || facts_request_id == NULL || source_address == NULL || transport == NULL)
        goto done;
    if (!PyBytes_CheckExact(fingerprint) || !PyUnicode_CheckExact(facts_request_id)
        || !PyUnicode_CheckExact(source_address))
        goto python;

    /* -- the head and the volatile values */
    PyObject *decision_id = attr(&held, decision, s_decision_id), *revision = attr(&held, decision, s_policy_version);
    if (decision_id == NULL || revision == NULL) goto done;
    status = out_head(&out, head, PyTuple_GET_ITEM(state, ST_TIMESTAMP), decision_id, now, revision);
    if (status <= 0) goto status;
    status = redact_volatiles(&v, request_id, port, time_value, volatile_headers, volatile_masked);
    if (status <= 0) goto status;

    /* -- the request's members: its shape's template, and what changes within the shape */
    PyObject *changing = memo_get(PyTuple_GET_ITEM(state, ST_CHANGING), fingerprint), *method = NULL, *path = NULL;
    PyObject *headers = NULL;
    if (changing == NULL) {
        if (PyErr_Occurred()) goto done;
        PyObject *factory = attr(&held, facts, s_attributes_factory);
        if (factory == NULL) goto done;
        PyObject *shape = hold(&held, PyObject_CallMethodOneArg(factory, s_shape, facts));
        if (shape == NULL) goto not_shaped;
        if (!PyTuple_CheckExact(shape) || PyTuple_GET_SIZE(shape) != 4) goto python;
        key = PyTuple_GET_ITEM(shape, 0);
        method = PyTuple_GET_ITEM(shape, 1);
        path = PyTuple_GET_ITEM(shape, 2);
        headers = PyTuple_GET_ITEM(shape, 3);
    } else {
        hold(&held, Py_NewRef(changing));
        if (!PyTuple_Check(changing) || PyTuple_GET_SIZE(changing) != 5) goto python;
        key = PyTuple_GET_ITEM(changing, 0);
    }
    template_key = Py_BuildValue("(OOOOO)", key, PyUnicode_GET_LENGTH(request_id) ? Py_True : Py_False,
                                 PyObject_IsTrue(port) ? Py_True : Py_False, time_value != Py_None ? Py_True : Py_False,
                                 PyDict_GET_SIZE(volatile_headers) ? Py_True : Py_False);
    if (template_key == NULL) goto done;
    PyObject *template = memo_get(PyTuple_GET_ITEM(state, ST_SHAPES), template_key);
    if (template == NULL || Py_TYPE(template) != (PyTypeObject *)rec_template_type) {
        if (PyErr_Occurred()) goto done;
        goto python; /* to be made, or one that cannot be: the Python path */
    }
    hold(&held, Py_NewRef(template));
    PyObject *template_masked = attr(&held, template, s_masked), *template_erased = attr(&held, template, s_erased);
    if (template_masked == NULL || template_erased == NULL) goto done;
    Piece values[10] = {out_piece(&v.id), out_piece(&v.port), out_piece(&v.time)};
    PyObject *changing_masked, *changing_erased;
    if (changing == NULL) {
        PyObject *new_masked = hold(&held, PyList_New(0));
        if (new_masked == NULL) goto done;
        status = redact_changing(facts, method, path, headers, changing_out, new_masked);
        if (status <= 0) goto status;
        /* from here on the builder keeps what the Python path would: no way back to it */
        PyObject *sighted = PyTuple_GET_ITEM(state, ST_SIGHTED);
        int repeat = PyDict_Contains(sighted, fingerprint);
        if (repeat < 0) goto done;
        if (repeat) {
            PyObject *kept = hold(&held, new_changing(key, changing_out, new_masked));
            if (kept == NULL || !call_keep(PyTuple_GET_ITEM(state, ST_CHANGING), fingerprint, kept)) goto done;
        } else if (!call_keep(sighted, fingerprint, Py_None)) {
            goto done;
        }
        for (int i = 0; i < 7; i++) values[3 + i] = out_piece(&changing_out[i]);
        changing_masked = new_masked;
        changing_erased = NULL;
    } else {
        PyObject *parts = PyTuple_GET_ITEM(changing, 2);
        if (!piece_of(&values[3], PyTuple_GET_ITEM(changing, 1))) goto done;
        if (!PyTuple_Check(parts) || PyTuple_GET_SIZE(parts) != 6) goto python;
        for (int i = 0; i < 6; i++)
            if (!piece_of(&values[4 + i], PyTuple_GET_ITEM(parts, i))) goto done;
        changing_masked = PyTuple_GET_ITEM(changing, 3);
        changing_erased = PyTuple_GET_ITEM(changing, 4);
    }
    if (v.headers.len) { /* the volatile headers after the others (with_volatile puts them last) */
        int written = values[3].len == 2
            ? out_raw(&joined_headers, v.headers.buf, v.headers.len)
            : out_raw(&joined_headers, values[3].buf, values[3].len - 1) && out_literal(&joined_headers, ",")
                  && out_raw(&joined_headers, v.headers.buf + 1, v.headers.len - 1);
        if (!written) goto done;
        values[3] = out_piece(&joined_headers);
    }
    if (!out_filled(&out, template, values, 10) || !extend(masked, template_masked) || !extend(masked, changing_masked)
        || !extend(erased, template_erased) || (changing_erased != NULL && !extend(erased, changing_erased)))
        goto done;

    /* -- the identity, the signals, the result */
    PyObject *identity = attr(&held, decision, s_identity);
    PyObject *identity_key = identity == NULL ? NULL : attr(&held, identity, s_fingerprint);
    if (identity_key == NULL) goto done;
    int keyed = PyObject_IsTrue(identity_key);
    if (keyed < 0) goto done;
    PyObject *person = entry_or(&held, PyTuple_GET_ITEM(state, ST_IDENTITIES), keyed ? identity_key : NULL, builder,
                                s_who, decision);
    PyObject *signals = attr(&held, decision, s_signals);
    PyObject *signals_key = signals == NULL ? NULL : hold(&held, PyObject_CallOneArg(rec_dumps, signals));
    if (person == NULL || signals_key == NULL) goto done;
    PyObject *signals_entry = entry_or(&held, PyTuple_GET_ITEM(state, ST_SIGNALS), signals_key, builder,
                                       s_signals_member, signals);
    PyObject *person_rendered = attr(&held, person, s_rendered);
    if (signals_entry == NULL || person_rendered == NULL) goto done;
    if (!PyTuple_Check(signals_entry) || PyTuple_GET_SIZE(signals_entry) != 3) {
        PyErr_SetString(PyExc_TypeError, "a kept signals member is (rendered, masked, erased)");
        goto done;
    }
    if (!out_literal(&out, ",") || !out_bytes(&out, person_rendered) || !out_literal(&out, ",")
        || !out_bytes(&out, PyTuple_GET_ITEM(signals_entry, 0)) || !out_literal(&out, "}")
        || !extend(masked, attr(&held, person, s_masked)) || !extend(masked, volatile_masked)
        || !extend(masked, PyTuple_GET_ITEM(signals_entry, 1)) || !extend(erased, attr(&held, person, s_erased))
        || !extend(erased, PyTuple_GET_ITEM(signals_entry, 2)))
        goto done;
    PyObject *policy_result = attr(&held, decision, s_result);
    if (policy_result == NULL) goto done;
    if (policy_result == Py_True || policy_result == Py_False) {
        if (!out_literal(&out, ",\"result\":") || !out_json(&out, policy_result)) goto done;
    } else if (policy_result != Py_None) {
        PyObject *entry = hold(&held, PyObject_CallMethodOneArg(builder, s_result_method, policy_result));
        if (entry == NULL) goto done;
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 2) {
            PyErr_SetString(PyExc_TypeError, "a kept result is (rendered, masked)");
            goto done;
        }
        if (!out_literal(&out, ",\"result\":") || !out_bytes(&out, PyTuple_GET_ITEM(entry, 0))
            || !extend(masked, PyTuple_GET_ITEM(entry, 1)))
            goto done;
    }

    /* -- who asked, how long it took, the verdict */
    if (PyUnicode_GET_LENGTH(source_address)) {
        PyObject *source_port = attr(&held, facts, s_source_port);
        if (source_port == NULL) goto done;
        int with_port = PyObject_IsTrue(source_port);
        if (with_port < 0) goto done;
        PyObject *requested_by = hold(&held, with_port ? PyUnicode_FromFormat("%U:%S", source_address, source_port)
                                                       : Py_NewRef(source_address));
        PyObject *clean = requested_by == NULL ? NULL : hold(&held, scrubbed(requested_by));
        if (clean == NULL || !out_literal(&out, ",\"requested_by\":") || !out_json(&out, clean)) goto done;
        int differs = clean == requested_by ? 0 : PyObject_RichCompareBool(clean, requested_by, Py_NE);
        PyObject *pointer = differs > 0 ? hold(&held, PyUnicode_FromString("/requested_by")) : NULL;
        if (differs < 0 || (differs > 0 && (pointer == NULL || PyList_Append(masked, pointer) != 0))) goto done;
    }
    if (!out_literal(&out, ",\"metrics\":{\"timer_server_handler_ns\":") || !out_json(&out, handler_ns)
        || !out_literal(&out, "},"))
        goto done;
    PyObject *person_subject = attr(&held, person, s_subject), *person_spiffe_id = attr(&held, person, s_spiffe_id);
    PyObject *allowed = attr(&held, decision, s_allowed), *code = attr(&held, decision, s_code);
    PyObject *reason = attr(&held, decision, s_reason), *http_status = attr(&held, decision, s_http_status);
    PyObject *phase = attr(&held, decision, s_phase), *cached = attr(&held, decision, s_cached);
    PyObject *dry_run = attr(&held, decision, s_dry_run);
    if (person_subject == NULL || person_spiffe_id == NULL || allowed == NULL || code == NULL || reason == NULL
        || http_status == NULL || phase == NULL || cached == NULL || dry_run == NULL)
        goto done;
    PyObject *verdict_key = hold(&held, PyTuple_Pack(9, allowed, code, reason, http_status, phase, cached, dry_run,
                                                     person_subject, person_spiffe_id));
    PyObject *verdict = verdict_key == NULL ? NULL : memo_get(PyTuple_GET_ITEM(state, ST_VERDICTS), verdict_key);
    if (verdict != NULL) {
        hold(&held, Py_NewRef(verdict));
    } else {
        if (PyErr_Occurred()) goto done;
        PyObject *call[3] = {builder, decision, person};
        verdict = hold(&held, PyObject_VectorcallMethod(s_verdict, call, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL));
        if (verdict == NULL) goto done;
    }
    PyObject *verdict_rendered = attr(&held, verdict, s_rendered);
    if (verdict_rendered == NULL || !out_bytes(&out, verdict_rendered)
        || !extend(masked, attr(&held, verdict, s_masked)))
        goto done;
    int dry = PyObject_IsTrue(dry_run);
    if (dry < 0) goto done;
    if (dry) {
        PyObject *would_allow = attr(&held, decision, s_would_allow);
        if (would_allow == NULL || !out_literal(&out, ",\"would_allow\":") || !out_json(&out, would_allow)) goto done;
    }
    if (PyUnicode_CheckExact(transport) && PyUnicode_Compare(transport, s_grpc) == 0) {
        if (!out_literal(&out, ",\"transport\":\"grpc\"")) goto done;
    } else if (PyUnicode_CheckExact(transport) && PyUnicode_Compare(transport, s_http) == 0) {
        if (!out_literal(&out, ",\"transport\":\"http\"")) goto done;
    } else if (!out_literal(&out, ",\"transport\":") || !out_json(&out, transport)) {
        goto done;
    }
    if (PyUnicode_GET_LENGTH(facts_request_id)) {
        if (!out_literal(&out, ",\"request_id\":")) goto done;
        int same = PyUnicode_Compare(facts_request_id, request_id) == 0, differs;
        if (same) { /* redacted and rendered for the attributes already */
            differs = v.id_changed;
            if (!out_raw(&out, v.id.buf, v.id.len)) goto done;
        } else {
            PyObject *clean = hold(&held, scrubbed(facts_request_id));
            if (clean == NULL || !out_json(&out, clean)) goto done;
            differs = clean == facts_request_id ? 0 : PyObject_RichCompareBool(clean, facts_request_id, Py_NE);
            if (differs < 0) goto done;
        }
        PyObject *pointer = differs ? hold(&held, PyUnicode_FromString("/request_id")) : NULL;
        if (differs && (pointer == NULL || PyList_Append(masked, pointer) != 0)) goto done;
    }
    if ((PyList_GET_SIZE(erased) && (!out_literal(&out, ",\"erased\":") || !out_list(&out, erased)))
        || (PyList_GET_SIZE(masked) && (!out_literal(&out, ",\"masked\":") || !out_list(&out, masked)))
        || !out_literal(&out, "}"))
        goto done;
    PyObject *line = hold(&held, PyBytes_FromStringAndSize(out.buf, out.len));
    PyObject *subject = attr(&held, verdict, s_subject), *spiffe_id = attr(&held, verdict, s_spiffe_id);
    if (line == NULL || subject == NULL || spiffe_id == NULL) goto done;
    PyObject *fields[9] = {decision_id, now, subject, spiffe_id, allowed, code, revision, Py_None, line};
    result = PyObject_Vectorcall(rec_record_type, fields, 9, NULL);
    goto done;
status:
    if (status < 0) goto done;
    goto python;
not_shaped:
    if (!PyErr_ExceptionMatches(PyExc_AttributeError)) goto done;
    PyErr_Clear();
python:
    result = Py_NewRef(Py_None);
done:
    for (int i = 0; i < held.count; i++) Py_DECREF(held.refs[i]);
    for (int i = 0; i < 7; i++) PyMem_Free(changing_out[i].buf);
    PyMem_Free(out.buf);
    PyMem_Free(joined_headers.buf);
    PyMem_Free(v.id.buf);
    PyMem_Free(v.port.buf);
    PyMem_Free(v.time.buf);
    PyMem_Free(v.headers.buf);
    Py_XDECREF(masked);
    Py_XDECREF(erased);
    Py_XDECREF(volatile_masked);
    Py_XDECREF(template_key);
    return result;
}

/* configure_records(dumps, scrub_text, header_rule, header_pointer, token_parameters, template_type,
 * changing_type, record_type, parse_body): what record() calls and checks against, from
 * audit.builder (once, at its import). */
static PyObject *configure_records(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *given[9];
    if (!PyArg_ParseTuple(args, "OOOOOOOOO:configure_records", &given[0], &given[1], &given[2], &given[3],
                          &given[4], &given[5], &given[6], &given[7], &given[8]))
        return NULL;
    if (!PyAnySet_Check(given[4]) || !PyType_Check(given[5]) || !PyType_Check(given[6]) || !PyType_Check(given[7]))
        return PyErr_Format(PyExc_TypeError, "configure_records: token parameters a set, then three types");
    static const char *names[] = {
        "decision_id", "policy_version", "identity", "signals", "result", "allowed", "code", "reason", "http_status",
        "phase", "cached", "dry_run", "would_allow", "explanation", "fingerprint", "attributes_factory", "shape",
        "headers", "body", "raw_body", "source_address", "source_port", "transport", "request_id", "port",
        "time_value", "fragments", "slots", "masked", "erased", "rendered", "subject", "spiffe_id", "keep", "_who",
        "_verdict", "_signals_member", "_result", "_second", "_prefix", "grpc", "http", "x-envoy-auth-partial-body"};
    PyObject **slots[] = {
        &s_decision_id, &s_policy_version, &s_identity, &s_signals, &s_result, &s_allowed, &s_code, &s_reason,
        &s_http_status, &s_phase, &s_cached, &s_dry_run, &s_would_allow, &s_explanation, &s_fingerprint,
        &s_attributes_factory, &s_shape, &s_headers, &s_body, &s_raw_body, &s_source_address, &s_source_port,
        &s_transport, &s_request_id, &s_port, &s_time_value, &s_fragments, &s_slots, &s_masked, &s_erased,
        &s_rendered, &s_subject, &s_spiffe_id, &s_keep, &s_who, &s_verdict, &s_signals_member, &s_result_method,
        &s_second, &s_prefix, &s_grpc, &s_http, &s_partial_body};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        if (*slots[i] != NULL) continue;
        if ((*slots[i] = PyUnicode_InternFromString(names[i])) == NULL) return NULL;
    }
    PyObject **kept[] = {&rec_dumps, &rec_scrub, &rec_header_rule, &rec_header_pointer, &rec_token_parameters,
                         &rec_template_type, &rec_changing_type, &rec_record_type, &rec_parse_body};
    for (int i = 0; i < 9; i++) Py_XSETREF(*kept[i], Py_NewRef(given[i]));
    Py_RETURN_NONE;
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
    {"configure_records", configure_records, METH_VARARGS,
     "configure_records(dumps, scrub_text, header_rule, header_pointer, token_parameters, template_type, "
     "changing_type, record_type, parse_body)"},
    {"record", (PyCFunction)(void (*)(void))record, METH_FASTCALL,
     "record(state, decision, facts, volatile, now, handler_ns) -> AuditRecord | None: "
     "RecordBuilder._fast's usual record"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_volatile_cut",
    "The exact repeat key of a CheckRequest, cut from its wire bytes; its audit shape; the audit headers loop; "
    "the usual audit record.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__volatile_cut(void) { return PyModule_Create(&module_def); }
