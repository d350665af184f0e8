{{/* Chart name. */}}
{{- define "tower-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name when it already names the chart. */}}
{{- define "tower-agent.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Namespace of the chart's namespaced objects. */}}
{{- define "tower-agent.namespace" -}}
{{- default .Release.Namespace .Values.namespace }}
{{- end }}

{{- define "tower-agent.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tower-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tower-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tower-agent.labels" -}}
helm.sh/chart: {{ include "tower-agent.chart" . }}
{{ include "tower-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: agent
app.kubernetes.io/part-of: tower
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "tower-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tower-agent.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference. */}}
{{- define "tower-agent.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret holding the join token, and its key. */}}
{{- define "tower-agent.tokenSecretName" -}}
{{- default (printf "%s-join-token" (include "tower-agent.fullname" .)) .Values.existingSecret.name }}
{{- end }}

{{- define "tower-agent.tokenSecretKey" -}}
{{- if .Values.existingSecret.name }}{{ default "joinToken" .Values.existingSecret.key }}{{ else }}joinToken{{ end }}
{{- end }}
