/* Attributes read where they are: the C extensions' one form of it (included by both).
 *
 * Most of what the C hooks and the C audit record read are __slots__ members (Decision, Facts and
 * Volatile are slots dataclasses, and so are the audit builder's kept fragments; the tracing
 * clock has members): read here straight from the object, at the offset found once per type.
 * The generic read goes through the type's attribute cache, whose entries an evaluation has left
 * cold: at ~20 reads a decision that was 2.6 µs of tracing's observe in a busy server.
 * Anything else (an instance dict, a property, a type with its own __getattribute__, a type
 * changed since: its version tag moved), and an unset slot, is read the generic way, with its
 * exact answer or error. Names are interned strings, compared by identity. */
#ifndef AUTHZ_SLOTS_H
#define AUTHZ_SLOTS_H

#include <Python.h>
#include <structmember.h>

#define SLOT_TYPES 12
#define SLOT_NAMES 24

typedef struct {
    PyTypeObject *type; /* held */
    unsigned int version;
    int count;
    PyObject *names[SLOT_NAMES]; /* interned: compared by identity */
    Py_ssize_t offsets[SLOT_NAMES]; /* 0: not a slot member, read generically */
} SlotTable;

static SlotTable slot_tables[SLOT_TYPES];
static int next_table;

static SlotTable *table_of(PyTypeObject *type) {
    if (type->tp_getattro != PyObject_GenericGetAttr || !PyType_HasFeature(type, Py_TPFLAGS_VALID_VERSION_TAG))
        return NULL; /* its own __getattribute__, or a type being changed */
    SlotTable *table = NULL;
    for (int i = 0; i < SLOT_TYPES; i++)
        if (slot_tables[i].type == type) table = &slot_tables[i];
    if (table == NULL) {
        table = &slot_tables[next_table];
        next_table = (next_table + 1) % SLOT_TYPES;
        Py_XSETREF(table->type, (PyTypeObject *)Py_NewRef(type));
        table->count = 0;
        table->version = type->tp_version_tag;
    } else if (table->version != type->tp_version_tag) {
        table->count = 0;
        table->version = type->tp_version_tag;
    }
    return table;
}

static Py_ssize_t member_offset(PyTypeObject *type, PyObject *name) {
    PyObject *descriptor = _PyType_Lookup(type, name); /* borrowed; never raises */
    if (descriptor == NULL || Py_TYPE(descriptor) != &PyMemberDescr_Type) return 0;
    PyMemberDef *member = ((PyMemberDescrObject *)descriptor)->d_member;
    return member->type == T_OBJECT_EX || member->type == T_OBJECT ? member->offset : 0;
}

/* getattr(object, name): ``name`` one of the interned names above */
static PyObject *attribute(PyObject *object, PyObject *name) {
    SlotTable *table = table_of(Py_TYPE(object));
    if (table != NULL) {
        Py_ssize_t offset = -1;
        for (int i = 0; i < table->count; i++)
            if (table->names[i] == name) offset = table->offsets[i];
        if (offset < 0) {
            offset = member_offset(Py_TYPE(object), name);
            if (table->count < SLOT_NAMES && table->version == Py_TYPE(object)->tp_version_tag) {
                table->names[table->count] = name;
                table->offsets[table->count++] = offset;
            }
        }
        if (offset > 0) {
            PyObject *value = *(PyObject **)((char *)object + offset);
            if (value != NULL) return Py_NewRef(value);
        }
    }
    return PyObject_GetAttr(object, name);
}

#endif
