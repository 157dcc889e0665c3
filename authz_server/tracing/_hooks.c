/* Tracing's request-path hooks in C: the phase clock, the sampler's usual answers, what a span
 * keeps of its decision, and the usual span made (authz_server/tracing/spans.py and otlp.py say
 * what each means; their Python forms are the reference, and what runs when this module is not
 * built: tests/unit/test_tracing_hooks.py holds the two to the same answers and bytes).
 *
 * Why C: these run on the event loop for every sampled decision, right after a policy evaluation
 * whose engine has left the CPU's caches cold. There, in the benchmark's decisions, their Python
 * cost 5-6 µs a decision against 1.4 warm: a handful of interpreted functions, each one's code,
 * constants and caches read back from memory. In C they are one call each, and the tracer's
 * thread makes the usual span the same way (docs/benchmarks.md, tracing: what it saved).
 *
 *   PhaseClock(context)          spans.PhaseClock
 *   start(sample, usual, drops, facts)
 *                                spans.DecisionTracer.start over otlp.OtlpSpans.sample's usual cases
 *   observe(tracer, keep, queue, decision, facts, now)
 *                                spans.DecisionTracer.observe
 *   keep(layouts, sample, span, clock_ns, decision, facts, now)
 *                                otlp.OtlpSpans.keep
 *   span(layouts, getrandbits, general, kept)
 *                                otlp.OtlpSpans._span of the usual span (the rest: ``general``)
 *   configure_tracer(...), configure_sink(...)
 *                                the constants and helpers those read, from spans.py and otlp.py
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>
#include <time.h>

/* set by configure_tracer() and configure_sink() */
static PyObject *failed_phases, *failed_codes, *standard_methods, *methods_known, *response_event,
    *cache_repeat_event, *who, *unsampled_digits, *not_sampled, *keep_failed;
/* interned names, set as the module loads */
static PyObject *s_phase_clock, *s_context, *s_shape, *s_phase, *s_code, *s_decision_id, *s_identity,
    *s_document, *s_cached, *s_allowed, *s_policy_version, *s_http_status, *s_dry_run, *s_would_allow,
    *s_signals, *s_explanation, *s_method, *s_transport, *s_verdict, *s_headers, *s_attributes_factory,
    *s_volatile, *s_traceparent, *s_tracestate, *s_get, *s_mode, *s_empty, *s_none, *s_upper, *s_other,
    *s_error_key, *s_unsampled_observed, *s_max_queue, *s_dropped, *s_batch, *s_wake, *s_set, *s_append,
    *s_start_ns, *s_times, *s_pack;

static int configured(PyObject *setting, const char *by);

static PyObject *now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts); /* what time.time_ns() reads */
    return PyLong_FromLongLong((long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
}

#include "../_slots.h"

/* What a kept span is made of never takes part in a reference cycle: immutable tuples of names,
 * flags, numbers and ids, made here after what they hold, and the clock's list of times. Left
 * tracked, each would be walked by the garbage collector while it waits in the tracer's queue
 * (nine young collections in a thousand traced decisions, against one without: 0.7 µs a
 * decision, measured); CPython untracks such tuples itself, but only once a collection has
 * walked them. So they are untracked as they are made. */
static PyObject *untracked(PyObject *object) {
    if (object != NULL && PyObject_GC_IsTracked(object)) PyObject_GC_UnTrack(object);
    return object;
}

/* -- PhaseClock */

typedef struct {
    PyObject_HEAD
    PyObject *start_ns;
    PyObject *times;
    PyObject *shape;
    PyObject *context;
} Clock;

static PyObject *new_clock(PyTypeObject *type, PyObject *context) {
    Clock *self = (Clock *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->start_ns = now_ns();
    self->times = untracked(PyList_New(0));
    if (self->start_ns == NULL || self->times == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    self->shape = Py_NewRef(Py_None);
    self->context = Py_NewRef(context);
    return untracked((PyObject *)self); /* it holds its context, times and marks: none holds it */
}

static PyObject *clock_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    PyObject *context;
    static char *names[] = {"context", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O:PhaseClock", names, &context)) return NULL;
    return new_clock(type, context);
}

static int clock_traverse(Clock *self, visitproc visit, void *arg) {
    Py_VISIT(self->start_ns);
    Py_VISIT(self->times);
    Py_VISIT(self->shape);
    Py_VISIT(self->context);
    return 0;
}

static int clock_clear(Clock *self) {
    Py_CLEAR(self->start_ns);
    Py_CLEAR(self->times);
    Py_CLEAR(self->shape);
    Py_CLEAR(self->context);
    return 0;
}

static void clock_dealloc(Clock *self) {
    PyObject_GC_UnTrack(self);
    clock_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *clock_mark(Clock *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) return PyErr_Format(PyExc_TypeError, "mark(phase, detail=None)");
    if (self->times == NULL || !PyList_Check(self->times))
        return PyErr_Format(PyExc_TypeError, "the clock's times must be a list");
    PyObject *at = now_ns();
    if (at == NULL) return NULL;
    int appended = PyList_Append(self->times, at);
    Py_DECREF(at);
    if (appended < 0) return NULL;
    PyObject *shape = untracked(PyTuple_Pack(3, self->shape ? self->shape : Py_None, args[0],
                                             nargs == 2 ? args[1] : Py_None));
    if (shape == NULL) return NULL;
    Py_XSETREF(self->shape, shape);
    Py_RETURN_NONE;
}

static PyObject *clock_phases(Clock *self, PyObject *unused) {
    (void)unused;
    PyObject *marked = PyList_New(0);
    if (marked == NULL) return NULL;
    PyObject *shape = self->shape;
    while (shape != NULL && shape != Py_None) {
        if (!PyTuple_Check(shape) || PyTuple_GET_SIZE(shape) != 3) {
            Py_DECREF(marked);
            return PyErr_Format(PyExc_TypeError, "a clock's shape is nested (shape, phase, detail) tuples");
        }
        PyObject *pair = PyTuple_Pack(2, PyTuple_GET_ITEM(shape, 1), PyTuple_GET_ITEM(shape, 2));
        if (pair == NULL || PyList_Append(marked, pair) < 0) {
            Py_XDECREF(pair);
            Py_DECREF(marked);
            return NULL;
        }
        Py_DECREF(pair);
        shape = PyTuple_GET_ITEM(shape, 0);
    }
    if (PyList_Reverse(marked) < 0) {
        Py_DECREF(marked);
        return NULL;
    }
    return marked;
}

static PyMethodDef clock_methods[] = {
    {"mark", (PyCFunction)(void (*)(void))clock_mark, METH_FASTCALL, "mark(phase, detail=None): detail hashable"},
    {"phases", (PyCFunction)clock_phases, METH_NOARGS, "(phase, detail) of each mark, in order"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef clock_members[] = {
    {"start_ns", T_OBJECT_EX, offsetof(Clock, start_ns), 0, NULL},
    {"times", T_OBJECT_EX, offsetof(Clock, times), 0, NULL},
    {"shape", T_OBJECT_EX, offsetof(Clock, shape), 0, NULL},
    {"context", T_OBJECT_EX, offsetof(Clock, context), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject ClockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "authz_server.tracing._hooks.PhaseClock",
    .tp_doc = "spans.PhaseClock, in C",
    .tp_basicsize = sizeof(Clock),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = clock_new,
    .tp_traverse = (traverseproc)clock_traverse,
    .tp_clear = (inquiry)clock_clear,
    .tp_dealloc = (destructor)clock_dealloc,
    .tp_methods = clock_methods,
    .tp_members = clock_members,
};

/* -- the sampler's usual answers */

static int hex_digit(Py_UCS4 c) {
    if (c >= '0' && c <= '9') return (int)(c - '0');
    if (c >= 'a' && c <= 'f') return (int)(c - 'a' + 10);
    return -1; /* capitals too: W3C refuses them (attributes.parse_traceparent) */
}

/* attributes.parse_traceparent's usual form (version 00, 55 characters, lowercase hex, ids not
 * zero) into trace_id[16], parent[8] and its sampled flag; 0 for anything else (then Python reads it). */
static int usual_traceparent(PyObject *value, unsigned char *trace_id, unsigned char *parent, int *sampled) {
    if (!PyUnicode_Check(value) || PyUnicode_GET_LENGTH(value) != 55) return 0;
    int kind = PyUnicode_KIND(value);
    const void *data = PyUnicode_DATA(value);
    unsigned char raw[26];
    Py_ssize_t at = 0;
    for (int byte = 0; byte < 26; byte++) {
        if (at == 2 || at == 35 || at == 52) {
            if (PyUnicode_READ(kind, data, at) != '-') return 0;
            at++;
        }
        int high = hex_digit(PyUnicode_READ(kind, data, at)), low = hex_digit(PyUnicode_READ(kind, data, at + 1));
        if (high < 0 || low < 0) return 0;
        raw[byte] = (unsigned char)(high << 4 | low);
        at += 2;
    }
    if (raw[0] != 0) return 0;
    int zero_trace = 1, zero_span = 1;
    for (int i = 1; i < 17; i++) zero_trace &= raw[i] == 0;
    for (int i = 17; i < 25; i++) zero_span &= raw[i] == 0;
    if (zero_trace || zero_span) return 0;
    *sampled = raw[25] & 1;
    memcpy(trace_id, raw + 1, 16);
    memcpy(parent, raw + 17, 8);
    return 1;
}

/* getattr(object, name, None) as *found (NULL when absent): -1 on another error */
static int optional_attr(PyObject *object, PyObject *name, PyObject **found) {
    *found = attribute(object, name);
    if (*found != NULL) return 1;
    if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
    PyErr_Clear();
    return 0;
}

/* ``mapping.get(key)``, new reference (None when absent); NULL on error. */
static PyObject *get(PyObject *mapping, PyObject *key) {
    if (PyDict_CheckExact(mapping)) {
        PyObject *value = PyDict_GetItemWithError(mapping, key);
        if (value == NULL) return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
        return Py_NewRef(value);
    }
    return PyObject_CallMethodOneArg(mapping, s_get, key);
}

/* attributes.trace_header_in(facts, "traceparent"): the value (new reference) and, borrowed from
 * *holder (a new reference the caller releases), the headers it was found in. */
static PyObject *traceparent_in(PyObject *facts, PyObject **headers, PyObject **holder) {
    *holder = attribute(facts, s_headers);
    if (*holder == NULL) return NULL;
    *headers = *holder;
    PyObject *value = get(*headers, s_traceparent);
    if (value == NULL) return NULL;
    int truthy = PyObject_IsTrue(value);
    if (truthy < 0) {
        Py_DECREF(value);
        return NULL;
    }
    if (truthy) return value;
    PyObject *factory = attribute(facts, s_attributes_factory);
    if (factory == NULL) {
        Py_DECREF(value);
        return NULL;
    }
    PyObject *volatile_values = NULL;
    int found = optional_attr(factory, s_volatile, &volatile_values);
    Py_DECREF(factory);
    if (found < 0) {
        Py_DECREF(value);
        return NULL;
    }
    if (volatile_values == NULL || volatile_values == Py_None) {
        Py_XDECREF(volatile_values);
        return value;
    }
    PyObject *volatile_headers = attribute(volatile_values, s_headers);
    Py_DECREF(volatile_values);
    if (volatile_headers == NULL) {
        Py_DECREF(value);
        return NULL;
    }
    Py_SETREF(*holder, volatile_headers);
    *headers = volatile_headers;
    Py_SETREF(value, get(volatile_headers, s_traceparent));
    return value;
}

/* spans.DecisionTracer.start with otlp.OtlpSpans' sampler: start(sample, usual, drops, facts).
 * ``usual``: its rules sample every span but those of a valid unsampled parent (its
 * ``samples_by_flags``), so a traceparent whose flags' two characters say sampled is
 * kept unread, as ``sample`` keeps it; ``drops``: they drop those (its ``drops_unsampled_parents``),
 * so a valid one in its usual form whose flags say not sampled is dropped here. Anything else is
 * ``sample(facts)``'s to answer. */
static PyObject *start(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 4) return PyErr_Format(PyExc_TypeError, "start(sample, usual, drops, facts)");
    PyObject *sample = args[0], *facts = args[3], *context = NULL;
    int usual = PyObject_IsTrue(args[1]), drops = PyObject_IsTrue(args[2]);
    if (usual < 0 || drops < 0 || !configured(not_sampled, "configure_tracer") ||
        (usual && !configured(unsampled_digits, "configure_sink")))
        return NULL;
    if (usual && facts != Py_None) {
        PyObject *headers, *holder = NULL;
        PyObject *traceparent = traceparent_in(facts, &headers, &holder);
        if (traceparent == NULL) {
            Py_XDECREF(holder);
            return NULL;
        }
        /* sample's test: traceparent[54:55] not in UNSAMPLED_DIGITS and traceparent[2:3] == "-" */
        int decided = 0; /* 1: sampled, kept unread; -1: dropped */
        if (PyUnicode_Check(traceparent) && PyUnicode_GET_LENGTH(traceparent) > 2 &&
            PyUnicode_READ_CHAR(traceparent, 2) == '-') {
            decided = 1;
            if (PyUnicode_GET_LENGTH(traceparent) > 54) {
                PyObject *flag = PyUnicode_Substring(traceparent, 54, 55);
                int unsampled = flag ? PySet_Contains(unsampled_digits, flag) : -1;
                Py_XDECREF(flag);
                if (unsampled < 0) decided = 2;
                else if (unsampled) {
                    unsigned char trace[16], parent[8];
                    int sampled;
                    decided = drops && usual_traceparent(traceparent, trace, parent, &sampled) && !sampled ? -1 : 0;
                }
            }
        }
        if (decided == 1) {
            PyObject *tracestate = get(headers, s_tracestate);
            context = tracestate ? untracked(PyTuple_Pack(4, Py_None, Py_None, traceparent, tracestate)) : NULL;
            Py_XDECREF(tracestate);
        }
        Py_DECREF(traceparent);
        Py_XDECREF(holder);
        if (decided == -1) return Py_NewRef(not_sampled);
        if (decided == 2 || (decided == 1 && context == NULL)) return NULL;
    }
    if (context == NULL && (context = PyObject_CallOneArg(sample, facts)) == NULL) return NULL;
    if (context == Py_None) {
        Py_DECREF(context);
        return Py_NewRef(not_sampled);
    }
    PyObject *clock = new_clock(&ClockType, context);
    Py_DECREF(context);
    return clock;
}

/* -- what a span keeps */

/* attributes.failed */
static int failed(PyObject *decision) {
    PyObject *phase = attribute(decision, s_phase);
    if (phase == NULL) return -1;
    int in = PySet_Contains(failed_phases, phase);
    Py_DECREF(phase);
    if (in != 0) return in;
    PyObject *code = attribute(decision, s_code);
    if (code == NULL) return -1;
    in = PySet_Contains(failed_codes, code);
    Py_DECREF(code);
    return in;
}

/* attributes.attribute_shape's identity member */
static PyObject *identity_part(PyObject *decision) {
    PyObject *identity = attribute(decision, s_identity);
    if (identity == NULL) return NULL;
    PyObject *document = attribute(identity, s_document);
    Py_DECREF(identity);
    if (document == NULL) return NULL;
    int truthy = PyObject_IsTrue(document);
    if (truthy <= 0) {
        Py_DECREF(document);
        return truthy < 0 ? NULL : Py_NewRef(Py_None);
    }
    PyObject *result = NULL, *method = NULL, *method_text = NULL;
    PyObject *people = PyObject_CallOneArg(who, document);
    if (people == NULL) goto done;
    if (!PyTuple_Check(people) || PyTuple_GET_SIZE(people) != 2) {
        PyErr_SetString(PyExc_TypeError, "who() gives (subject, spiffe_id)");
        goto done;
    }
    method = get(document, s_method);
    if (method == NULL) goto done;
    truthy = PyObject_IsTrue(method);
    if (truthy < 0) goto done;
    method_text = truthy ? PyObject_Str(method) : Py_NewRef(s_none);
    if (method_text == NULL) goto done;
    result = untracked(PyTuple_Pack(3, method_text, PyTuple_GET_ITEM(people, 0), PyTuple_GET_ITEM(people, 1)));
done:
    Py_XDECREF(method_text);
    Py_XDECREF(method);
    Py_XDECREF(people);
    Py_DECREF(document);
    return result;
}

/* tuple(sorted(str(name) for name in signals)) if signals else None */
static PyObject *signal_names(PyObject *decision) {
    PyObject *signals = attribute(decision, s_signals);
    if (signals == NULL) return NULL;
    int truthy = PyObject_IsTrue(signals);
    if (truthy <= 0) {
        Py_DECREF(signals);
        return truthy < 0 ? NULL : Py_NewRef(Py_None);
    }
    PyObject *names = PyList_New(0), *iterator = PyObject_GetIter(signals), *name, *result = NULL;
    Py_DECREF(signals);
    if (names == NULL || iterator == NULL) goto done;
    while ((name = PyIter_Next(iterator)) != NULL) {
        PyObject *text = PyObject_Str(name);
        Py_DECREF(name);
        if (text == NULL || PyList_Append(names, text) < 0) {
            Py_XDECREF(text);
            goto done;
        }
        Py_DECREF(text);
    }
    if (PyErr_Occurred() || PyList_Sort(names) < 0) goto done;
    result = untracked(PyList_AsTuple(names));
done:
    Py_XDECREF(iterator);
    Py_XDECREF(names);
    return result;
}

/* str(explanation.get("mode", "")) if explanation else None */
static PyObject *explained(PyObject *decision) {
    PyObject *explanation = NULL;
    if (optional_attr(decision, s_explanation, &explanation) < 0) return NULL;
    if (explanation == NULL) return Py_NewRef(Py_None);
    int truthy = PyObject_IsTrue(explanation);
    if (truthy <= 0) {
        Py_DECREF(explanation);
        return truthy < 0 ? NULL : Py_NewRef(Py_None);
    }
    PyObject *mode = PyObject_CallMethodObjArgs(explanation, s_get, s_mode, s_empty, NULL);
    Py_DECREF(explanation);
    if (mode == NULL) return NULL;
    Py_SETREF(mode, PyObject_Str(mode));
    return mode;
}

/* (facts.transport, the method as the span names it) if facts is not None else None */
static PyObject *request_part(PyObject *facts) {
    if (facts == Py_None) return Py_NewRef(Py_None);
    PyObject *raw = attribute(facts, s_method);
    if (raw == NULL) return NULL;
    PyObject *method = PyDict_GetItemWithError(standard_methods, raw); /* borrowed */
    PyObject *owned = NULL, *result = NULL;
    if (method == NULL) {
        if (PyErr_Occurred()) goto done;
        PyObject *text = PyObject_Str(raw);
        if (text == NULL) goto done;
        owned = PyObject_CallMethodNoArgs(text, s_upper);
        Py_DECREF(text);
        if (owned == NULL) goto done;
        int known = PySet_Contains(methods_known, owned);
        if (known < 0) goto done;
        if (!known) Py_SETREF(owned, Py_NewRef(s_other));
        method = owned;
    }
    PyObject *transport = attribute(facts, s_transport);
    if (transport == NULL) goto done;
    result = untracked(PyTuple_Pack(2, transport, method));
    Py_DECREF(transport);
done:
    Py_XDECREF(owned);
    Py_DECREF(raw);
    return result;
}

/* attributes.attribute_shape */
static PyObject *attribute_shape(PyObject *decision, PyObject *facts) {
    PyObject *parts[11] = {NULL};
    PyObject *result = NULL;
    PyObject *names[6] = {s_allowed, s_code, s_phase, s_cached, s_policy_version, s_http_status};
    for (int i = 0; i < 6; i++)
        if ((parts[i] = attribute(decision, names[i])) == NULL) goto done;
    PyObject *dry_run = attribute(decision, s_dry_run);
    if (dry_run == NULL) goto done;
    int truthy = PyObject_IsTrue(dry_run);
    Py_DECREF(dry_run);
    if (truthy < 0) goto done;
    if (truthy) {
        PyObject *would_allow = attribute(decision, s_would_allow);
        if (would_allow == NULL) goto done;
        truthy = PyObject_IsTrue(would_allow);
        Py_DECREF(would_allow);
        if (truthy < 0) goto done;
        parts[6] = PyBool_FromLong(truthy);
    } else {
        parts[6] = Py_NewRef(Py_None);
    }
    if ((parts[7] = identity_part(decision)) == NULL || (parts[8] = signal_names(decision)) == NULL ||
        (parts[9] = explained(decision)) == NULL || (parts[10] = request_part(facts)) == NULL)
        goto done;
    result = PyTuple_New(11);
    if (result == NULL) goto done;
    untracked(result);
    for (int i = 0; i < 11; i++) {
        PyTuple_SET_ITEM(result, i, parts[i]);
        parts[i] = NULL;
    }
done:
    for (int i = 0; i < 11; i++) Py_XDECREF(parts[i]);
    return result;
}

/* spans.last_phase */
static PyObject *last_phase(PyObject *decision, PyObject *phases, PyObject *cached, int error) {
    int is_cached = PyObject_IsTrue(cached);
    if (is_cached < 0) return NULL;
    if (phases == Py_None && is_cached) return Py_NewRef(cache_repeat_event);
    if (!error) {
        PyObject *verdict = attribute(decision, s_verdict), *allowed;
        if (verdict == NULL) return NULL;
        Py_DECREF(verdict);
        if (verdict != Py_None) return Py_NewRef(response_event);
        if ((allowed = attribute(decision, s_allowed)) == NULL) return NULL;
        int allows = PyObject_IsTrue(allowed);
        Py_DECREF(allowed);
        if (allows < 0) return NULL;
        if (allows) return Py_NewRef(response_event);
    }
    PyObject *phase = attribute(decision, s_phase), *code = attribute(decision, s_code), *result = NULL;
    if (phase != NULL && code != NULL) {
        PyObject *error_attribute = untracked(PyTuple_Pack(2, s_error_key, code));
        PyObject *attributes = error_attribute ? untracked(PyTuple_Pack(1, error_attribute)) : NULL;
        result = attributes ? untracked(PyTuple_Pack(2, phase, attributes)) : NULL;
        Py_XDECREF(attributes);
        Py_XDECREF(error_attribute);
    }
    Py_XDECREF(phase);
    Py_XDECREF(code);
    return result;
}

static PyObject *keep(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 7)
        return PyErr_Format(PyExc_TypeError, "keep(layouts, sample, span, clock_ns, decision, facts, now)");
    PyObject *layouts = args[0], *sample = args[1], *span = args[2], *decision = args[4], *facts = args[5],
             *now = args[6];
    if (!PyDict_Check(layouts)) return PyErr_Format(PyExc_TypeError, "layouts must be a dict");
    if (!configured(failed_phases, "configure_sink")) return NULL;
    PyObject *end_ns = PyObject_CallNoArgs(args[3]), *phases = NULL, *context = NULL, *cached = NULL,
             *decision_id = NULL, *attributes = NULL, *key = NULL, *last = NULL, *marked = NULL, *shape = NULL,
             *kept = NULL, *result = NULL;
    if (end_ns == NULL || (phases = attribute(decision, s_phase_clock)) == NULL) goto done;
    context = phases != Py_None ? attribute(phases, s_context) : PyObject_CallOneArg(sample, facts);
    if (context == NULL) goto done;
    if (context == Py_None) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    int error = failed(decision);
    if (error < 0 || (decision_id = attribute(decision, s_decision_id)) == NULL ||
        (cached = attribute(decision, s_cached)) == NULL || (attributes = attribute_shape(decision, facts)) == NULL)
        goto done;
    PyObject *code = error ? attribute(decision, s_code) : Py_NewRef(Py_None);
    if (code == NULL) goto done;
    key = untracked(PyTuple_Pack(2, attributes, code));
    Py_DECREF(code);
    if (key == NULL || (last = last_phase(decision, phases, cached, error)) == NULL) goto done;
    marked = phases != Py_None ? attribute(phases, s_shape) : Py_NewRef(Py_None);
    if (marked == NULL) goto done;
    PyObject *parent = PySequence_GetItem(context, 1);
    if (parent == NULL) goto done;
    Py_DECREF(parent);
    Py_ssize_t id_length = PyObject_Length(decision_id);
    if (id_length < 0) goto done;
    PyObject *length = PyLong_FromSsize_t(id_length);
    if (length == NULL) goto done;
    shape = untracked(PyTuple_Pack(5, key, last, marked, parent == Py_None ? Py_True : Py_False, length));
    Py_DECREF(length);
    if (shape == NULL) goto done;
    /* laid out: no trace state to read, and an id whose length in bytes is its length */
    PyObject *state = PySequence_GetItem(context, 2);
    if (state == NULL) goto done;
    Py_DECREF(state);
    int ascii;
    if (PyUnicode_Check(decision_id)) {
        ascii = PyUnicode_IS_ASCII(decision_id);
    } else {
        PyObject *answer = PyObject_CallMethod(decision_id, "isascii", NULL);
        if (answer == NULL) goto done;
        ascii = PyObject_IsTrue(answer);
        Py_DECREF(answer);
        if (ascii < 0) goto done;
    }
    PyObject *spanning = shape;
    if (state == Py_None && ascii) {
        PyObject *layout = PyDict_GetItemWithError(layouts, shape); /* borrowed */
        if (layout == NULL && PyErr_Occurred()) goto done;
        if (layout != NULL) {
            int truthy = PyObject_IsTrue(layout);
            if (truthy < 0) goto done;
            if (truthy) spanning = layout;
        }
    }
    kept = untracked(PyTuple_Pack(6, spanning, decision_id, phases, context, now, end_ns));
    if (kept == NULL) goto done;
    int is_cached = PyObject_IsTrue(cached);
    if (is_cached < 0) goto done;
    result = is_cached ? PyObject_CallOneArg(span, kept) : Py_NewRef(kept);
done:
    Py_XDECREF(kept);
    Py_XDECREF(shape);
    Py_XDECREF(marked);
    Py_XDECREF(last);
    Py_XDECREF(key);
    Py_XDECREF(attributes);
    Py_XDECREF(cached);
    Py_XDECREF(decision_id);
    Py_XDECREF(context);
    Py_XDECREF(phases);
    Py_XDECREF(end_ns);
    return result;
}

/* tracer.<name> += 1 */
static int count(PyObject *tracer, PyObject *name) {
    PyObject *value = PyObject_GetAttr(tracer, name);
    if (value == NULL) return -1;
    PyObject *one = PyLong_FromLong(1);
    PyObject *sum = one ? PyNumber_Add(value, one) : NULL;
    Py_XDECREF(one);
    Py_DECREF(value);
    if (sum == NULL) return -1;
    int set = PyObject_SetAttr(tracer, name, sum);
    Py_DECREF(sum);
    return set;
}

/* spans.DecisionTracer.observe: observe(tracer, keep, queue, decision, facts, now) */
static PyObject *observe(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 6) return PyErr_Format(PyExc_TypeError, "observe(tracer, keep, queue, decision, facts, now)");
    PyObject *tracer = args[0], *queue = args[2], *decision = args[3];
    if (!configured(keep_failed, "configure_tracer")) return NULL;
    PyObject *phases = attribute(decision, s_phase_clock);
    if (phases == NULL) return NULL;
    Py_DECREF(phases);
    if (phases == not_sampled) return count(tracer, s_unsampled_observed) < 0 ? NULL : Py_NewRef(Py_None);
    PyObject *kept = PyObject_Vectorcall(args[1], args + 3, 3, NULL);
    if (kept == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception)) return NULL;
        PyObject *type, *error, *traceback;  /* a bug here costs one span, never the decision */
        PyErr_Fetch(&type, &error, &traceback);
        PyErr_NormalizeException(&type, &error, &traceback);
        if (traceback != NULL) PyException_SetTraceback(error, traceback);
        PyObject *logged = PyObject_CallOneArg(keep_failed, error);
        Py_XDECREF(type);
        Py_XDECREF(error);
        Py_XDECREF(traceback);
        Py_XDECREF(logged);
        return logged == NULL ? NULL : Py_NewRef(Py_None);
    }
    PyObject *result = NULL;
    if (kept == Py_None) {
        result = count(tracer, s_unsampled_observed) < 0 ? NULL : Py_NewRef(Py_None);
        goto done;
    }
    Py_ssize_t length = PyObject_Length(queue);
    if (length < 0) goto done;
    PyObject *limit = attribute(tracer, s_max_queue);
    if (limit == NULL) goto done;
    Py_ssize_t max_queue = PyNumber_AsSsize_t(limit, NULL);
    Py_DECREF(limit);
    if (max_queue == -1 && PyErr_Occurred()) goto done;
    if (length >= max_queue) {
        result = count(tracer, s_dropped) < 0 ? NULL : Py_NewRef(Py_None);
        goto done;
    }
    PyObject *appended = PyObject_CallMethodOneArg(queue, s_append, kept);
    if (appended == NULL) goto done;
    Py_DECREF(appended);
    PyObject *batch = attribute(tracer, s_batch);
    if (batch == NULL) goto done;
    Py_ssize_t wake_at = PyNumber_AsSsize_t(batch, NULL);
    Py_DECREF(batch);
    if (wake_at == -1 && PyErr_Occurred()) goto done;
    if (length + 1 == wake_at) {
        PyObject *wake = attribute(tracer, s_wake);
        PyObject *woken = wake ? PyObject_CallMethodNoArgs(wake, s_set) : NULL;
        Py_XDECREF(wake);
        if (woken == NULL) goto done;
        Py_DECREF(woken);
    }
    result = Py_NewRef(Py_None);
done:
    Py_DECREF(kept);
    return result;
}

/* -- a span, made */

/* spans.span_start into *start_ns: 1, or -1 with the error Python's would raise */
static int span_start(PyObject *now, long long end_ns, PyObject *phases, long long *start_ns) {
    PyObject *scale = PyFloat_FromDouble(1e9);
    PyObject *product = scale ? PyNumber_Multiply(now, scale) : NULL;
    Py_XDECREF(scale);
    PyObject *whole = product ? PyNumber_Long(product) : NULL;
    Py_XDECREF(product);
    if (whole == NULL) return -1;
    int overflow;
    long long at = PyLong_AsLongLongAndOverflow(whole, &overflow);
    Py_DECREF(whole);
    if (at == -1 && PyErr_Occurred()) return -1;
    if (!overflow && end_ns - 60LL * 1000000000LL <= at && at <= end_ns) {
        *start_ns = at;
        return 1;
    }
    if (phases == Py_None) {
        *start_ns = end_ns;
        return 1;
    }
    PyObject *began = attribute(phases, s_start_ns);
    if (began == NULL) return -1;
    *start_ns = PyLong_AsLongLong(began);
    Py_DECREF(began);
    return *start_ns == -1 && PyErr_Occurred() ? -1 : 1;
}

/* otlp.OtlpSpans._span of the usual span: ``span(layouts, getrandbits, general, kept)``; any other
 * (a trace state, a traceparent not in its usual form, a shape without a layout) is ``general(kept)`` */
static PyObject *span(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 4) return PyErr_Format(PyExc_TypeError, "span(layouts, getrandbits, general, kept)");
    PyObject *layouts = args[0], *getrandbits = args[1], *general = args[2], *kept = args[3];
    if (!PyDict_Check(layouts) || !PyTuple_Check(kept) || PyTuple_GET_SIZE(kept) != 6)
        return PyObject_CallOneArg(general, kept);
    PyObject *spanning = PyTuple_GET_ITEM(kept, 0), *decision_id = PyTuple_GET_ITEM(kept, 1),
             *phases = PyTuple_GET_ITEM(kept, 2), *context = PyTuple_GET_ITEM(kept, 3),
             *now = PyTuple_GET_ITEM(kept, 4), *end = PyTuple_GET_ITEM(kept, 5);
    if (!PyTuple_Check(context) || PyTuple_GET_SIZE(context) != 4 || !PyUnicode_Check(decision_id) ||
        !PyUnicode_IS_ASCII(decision_id))
        return PyObject_CallOneArg(general, kept);
    PyObject *layout = NULL, *trace_id = NULL, *parent_id = NULL, *result = NULL;
    if (PyTuple_GET_ITEM(context, 0) == Py_None) { /* left unread by the sampler: read here */
        unsigned char trace[16], parent[8];
        PyObject *tracestate = PyTuple_GET_ITEM(context, 3);
        int stated = tracestate == Py_None ? 0 : PyObject_IsTrue(tracestate);
        if (stated < 0) return NULL;
        int sampled; /* it is: the sampler kept it unread for that */
        if (stated || !usual_traceparent(PyTuple_GET_ITEM(context, 2), trace, parent, &sampled) ||
            !PyTuple_Check(spanning) || PyTuple_GET_SIZE(spanning) != 5)
            return PyObject_CallOneArg(general, kept);
        PyObject *shape = PyTuple_Pack(5, PyTuple_GET_ITEM(spanning, 0), PyTuple_GET_ITEM(spanning, 1),
                                       PyTuple_GET_ITEM(spanning, 2), Py_False, PyTuple_GET_ITEM(spanning, 4));
        if (shape == NULL) return NULL;
        layout = PyDict_GetItemWithError(layouts, shape); /* borrowed */
        Py_DECREF(shape);
        if (layout == NULL && PyErr_Occurred()) return NULL;
        if (layout == NULL || layout == Py_None) return PyObject_CallOneArg(general, kept);
        Py_INCREF(layout); /* held before anything can run that might change the dict */
        trace_id = PyBytes_FromStringAndSize((const char *)trace, 16);
        parent_id = PyBytes_FromStringAndSize((const char *)parent, 8);
        if (trace_id == NULL || parent_id == NULL) goto done;
    } else {
        if (PyTuple_Check(spanning)) return PyObject_CallOneArg(general, kept);
        layout = Py_NewRef(spanning);
        trace_id = Py_NewRef(PyTuple_GET_ITEM(context, 0));
        parent_id = Py_NewRef(PyTuple_GET_ITEM(context, 1));
    }
    long long end_ns = PyLong_AsLongLong(end), start_ns, began_ns;
    if (end_ns == -1 && PyErr_Occurred()) goto done;
    if (span_start(now, end_ns, phases, &start_ns) < 0) goto done;
    began_ns = start_ns;
    if (phases != Py_None) {
        PyObject *clock_start = attribute(phases, s_start_ns);
        if (clock_start == NULL) goto done;
        long long clock_ns = PyLong_AsLongLong(clock_start);
        Py_DECREF(clock_start);
        if (clock_ns == -1 && PyErr_Occurred()) goto done;
        if (clock_ns > start_ns) began_ns = clock_ns;
    }
    PyObject *bits = PyLong_FromLong(64);
    PyObject *drawn = bits ? PyObject_CallOneArg(getrandbits, bits) : NULL;
    Py_XDECREF(bits);
    if (drawn == NULL) goto done;
    unsigned long long number = PyLong_AsUnsignedLongLong(drawn);
    Py_DECREF(drawn);
    if (number == (unsigned long long)-1 && PyErr_Occurred()) goto done;
    if (number == 0) number = 1; /* as the SDK's id generator: never the invalid id */
    unsigned char span_bytes[8];
    for (int i = 7; i >= 0; i--, number >>= 8) span_bytes[i] = (unsigned char)(number & 0xff);
    PyObject *pack = attribute(layout, s_pack);
    if (pack == NULL) goto done;
    PyObject *call[8] = {trace_id, PyBytes_FromStringAndSize((const char *)span_bytes, 8), parent_id,
                         PyLong_FromLongLong(start_ns), Py_NewRef(end), PyUnicode_AsASCIIString(decision_id),
                         PyLong_FromLongLong(began_ns),
                         phases != Py_None ? attribute(phases, s_times) : PyTuple_New(0)};
    int made[6] = {1, 3, 4, 5, 6, 7}, complete = 1; /* the arguments made here (trace and parent ids are held) */
    for (int i = 0; i < 6; i++) complete &= call[made[i]] != NULL;
    if (complete) result = PyObject_Vectorcall(pack, call, 8, NULL);
    for (int i = 0; i < 6; i++) Py_XDECREF(call[made[i]]);
    Py_DECREF(pack);
done:
    Py_XDECREF(layout);
    Py_XDECREF(trace_id);
    Py_XDECREF(parent_id);
    return result;
}

/* configure_tracer(not_sampled, keep_failed): what start and observe read (spans.py) */
static PyObject *configure_tracer(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *given[2];
    if (!PyArg_ParseTuple(args, "OO:configure_tracer", &given[0], &given[1])) return NULL;
    if (!PyCallable_Check(given[1])) return PyErr_Format(PyExc_TypeError, "keep_failed must be callable");
    Py_XSETREF(not_sampled, Py_NewRef(given[0]));
    Py_XSETREF(keep_failed, Py_NewRef(given[1]));
    Py_RETURN_NONE;
}

/* configure_sink(failed_phases, failed_codes, standard_methods, methods, response, cache_repeat, who,
 * unsampled_digits): what start's usual cases and keep read (otlp.py, from attributes.py and spans.py) */
static PyObject *configure_sink(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *given[8];
    if (!PyArg_ParseTuple(args, "O!O!O!O!O!O!OO!:configure_sink", &PyFrozenSet_Type, &given[0], &PyFrozenSet_Type,
                          &given[1], &PyDict_Type, &given[2], &PyFrozenSet_Type, &given[3], &PyTuple_Type, &given[4],
                          &PyTuple_Type, &given[5], &given[6], &PyFrozenSet_Type, &given[7]))
        return NULL;
    if (!PyCallable_Check(given[6])) return PyErr_Format(PyExc_TypeError, "who must be callable");
    PyObject **slots[8] = {&failed_phases, &failed_codes, &standard_methods, &methods_known, &response_event,
                           &cache_repeat_event, &who, &unsampled_digits};
    for (int i = 0; i < 8; i++) Py_XSETREF(*slots[i], Py_NewRef(given[i]));
    Py_RETURN_NONE;
}

static int configured(PyObject *setting, const char *by) {
    if (setting != NULL) return 1;
    PyErr_Format(PyExc_RuntimeError, "tracing's C hooks are not configured: %s first", by);
    return 0;
}

static PyMethodDef methods[] = {
    {"start", (PyCFunction)(void (*)(void))start, METH_FASTCALL,
     "start(sample, usual, drops, facts) -> PhaseClock | the not-sampled clock: DecisionTracer.start"},
    {"observe", (PyCFunction)(void (*)(void))observe, METH_FASTCALL,
     "observe(tracer, keep, queue, decision, facts, now): DecisionTracer.observe"},
    {"span", (PyCFunction)(void (*)(void))span, METH_FASTCALL,
     "span(layouts, getrandbits, general, kept) -> bytes: OtlpSpans._span of the usual span"},
    {"keep", (PyCFunction)(void (*)(void))keep, METH_FASTCALL,
     "keep(layouts, sample, span, clock_ns, decision, facts, now): OtlpSpans.keep"},
    {"configure_tracer", configure_tracer, METH_VARARGS, "configure_tracer(not_sampled, keep_failed)"},
    {"configure_sink", configure_sink, METH_VARARGS,
     "configure_sink(failed_phases, failed_codes, standard_methods, methods, response, cache_repeat, who, "
     "unsampled_digits)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_hooks", "Tracing's request-path hooks (see the source's opening comment).",
    -1, methods, NULL, NULL, NULL, NULL,
};

static int intern(PyObject **slot, const char *text) {
    *slot = PyUnicode_InternFromString(text);
    return *slot == NULL ? -1 : 0;
}

PyMODINIT_FUNC PyInit__hooks(void) {
    struct {
        PyObject **slot;
        const char *text;
    } names[] = {
        {&s_phase_clock, "phase_clock"}, {&s_context, "context"}, {&s_shape, "shape"}, {&s_phase, "phase"},
        {&s_code, "code"}, {&s_decision_id, "decision_id"}, {&s_identity, "identity"}, {&s_document, "document"},
        {&s_cached, "cached"}, {&s_allowed, "allowed"}, {&s_policy_version, "policy_version"},
        {&s_http_status, "http_status"}, {&s_dry_run, "dry_run"}, {&s_would_allow, "would_allow"},
        {&s_signals, "signals"}, {&s_explanation, "explanation"}, {&s_method, "method"},
        {&s_transport, "transport"}, {&s_verdict, "verdict"}, {&s_headers, "headers"},
        {&s_attributes_factory, "attributes_factory"}, {&s_volatile, "volatile"}, {&s_traceparent, "traceparent"},
        {&s_tracestate, "tracestate"}, {&s_get, "get"}, {&s_mode, "mode"}, {&s_empty, ""}, {&s_none, "none"},
        {&s_upper, "upper"}, {&s_other, "_OTHER"}, {&s_error_key, "authz.error"},
        {&s_unsampled_observed, "_unsampled_observed"}, {&s_max_queue, "max_queue"}, {&s_dropped, "dropped"},
        {&s_batch, "batch"}, {&s_wake, "_wake"}, {&s_set, "set"}, {&s_append, "append"}, {&s_start_ns, "start_ns"},
        {&s_times, "times"}, {&s_pack, "pack"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (intern(names[i].slot, names[i].text) < 0) return NULL;
    if (PyType_Ready(&ClockType) < 0) return NULL;
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) return NULL;
    if (PyModule_AddObjectRef(module, "PhaseClock", (PyObject *)&ClockType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
